#!/usr/bin/env python3
"""Checks token-gateway's documentation against the running code.

Driven by Tests/Integration/OpenAPIConformanceTests.swift, which records real answers of a real
gateway and hands them over as JSON files. Three commands:

  openapi_check.py spec DOC
      DOC (Docs/openapi.yaml) is a valid OpenAPI 3.1 document.

  openapi_check.py responses DOC RECORDS [--routes ROUTES]
      DOC is valid, and every recorded answer in RECORDS is described by it: the path and method
      exist, the status is listed for that operation, every required response header is present and
      matches its schema, the content type is one the response lists, the body matches its schema,
      and an error body's code comes with the status DOC's `ErrorCode` `x-status` gives it. With
      ROUTES (a JSON list of {"method", "path"} the gateway's router serves), every served route
      must be described.

  openapi_check.py observability --metrics TEXT --dashboard JSON --alerts YAML --operations MD
                                  [--require FAMILY ...]
      Every metric name (and every label, and every label value matched with `=`) that the Grafana
      dashboard and the Prometheus alert rules use exists in TEXT (a /metrics exposition); the
      dashboard is well formed and uses every --require family; every alert has a severity, a
      summary and a runbook_url pointing at an existing heading of MD; every token_gateway_ family in
      TEXT is described in MD.

Exit status 0 when everything holds, 1 with every problem listed otherwise, 2 on bad usage or a
missing Python package.
"""

import argparse
import json
import re
import sys

try:
    import yaml
    from openapi_schema_validator import OAS31Validator, oas31_format_checker
    from openapi_spec_validator import validate as validate_spec
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012
except ImportError as error:  # pragma: no cover - environment problem, reported loudly
    print(
        f"openapi_check: missing Python package ({error}); install with "
        "`python3 -m pip install openapi-spec-validator openapi-schema-validator jsonschema PyYAML`",
        file=sys.stderr,
    )
    sys.exit(2)

SPEC_URI = "urn:token-gateway:openapi"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


class Problems:
    """Collects every problem, so one run reports all of them."""

    def __init__(self):
        self.items = []

    def add(self, where, message):
        self.items.append(redact(f"{where}: {message}"))

    def finish(self, what, ok_line):
        if self.items:
            print(f"FAILED {what}: {len(self.items)} problem(s)", file=sys.stderr)
            for item in self.items:
                print("  - " + item.replace("\n", "\n    "), file=sys.stderr)
            sys.exit(1)
        print(ok_line)


JWT_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


def redact(text):
    """Hides anything shaped like a JWT (tokens, FITs, Connect JWTs) in what the checker prints."""
    return JWT_LIKE.sub("<jwt>", text)


def excerpt(text, limit=600):
    text = redact(text if isinstance(text, str) else json.dumps(text))
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


# ---------------------------------------------------------------------------------------------
# The OpenAPI document


def load_spec(path):
    with open(path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    try:
        validate_spec(spec)
    except Exception as error:  # the validator's own exception types vary between versions
        print(f"FAILED spec: {path} is not a valid OpenAPI 3.1 document:\n  {error}", file=sys.stderr)
        sys.exit(1)
    if not str(spec.get("openapi", "")).startswith("3.1"):
        print(f"FAILED spec: {path} declares openapi {spec.get('openapi')!r}, expected 3.1.x", file=sys.stderr)
        sys.exit(1)
    return spec


def pointer_escape(token):
    return str(token).replace("~", "~0").replace("/", "~1")


def resolve(spec, node, pointer):
    """Follows a local `$ref` of an OpenAPI object (response, header, parameter). Returns the
    object and its JSON pointer."""
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/") or ref in seen:
            raise ValueError(f"unsupported or cyclic $ref {ref!r} at {pointer}")
        seen.add(ref)
        pointer = ref[1:]
        node = spec
        for token in pointer[1:].split("/"):
            node = node[token.replace("~1", "/").replace("~0", "~")]
    return node, pointer


class SchemaChecker:
    """Validates instances against schemas inside the document, `$ref`s resolved in place."""

    def __init__(self, spec):
        resource = Resource.from_contents(spec, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(SPEC_URI, resource)

    def errors(self, pointer, instance):
        validator = OAS31Validator(
            {"$ref": f"{SPEC_URI}#{pointer}"}, registry=self.registry, format_checker=oas31_format_checker
        )
        found = []
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
            location = "/".join(str(p) for p in error.absolute_path) or "(root)"
            message = f"at {location}: {error.message}"
            for sub in (error.context or [])[:8]:
                sub_location = "/".join(str(p) for p in sub.absolute_path) or "(root)"
                message += f"\n  (alternative {'/'.join(str(p) for p in sub.relative_schema_path)}) at {sub_location}: {sub.message}"
            found.append(message)
        return found


def normalise_template(path):
    """`/v1/installations/{installationId}/token` and `/v1/installations/:id/token` both become
    `/v1/installations/{}/token`."""
    segments = []
    for segment in path.strip("/").split("/"):
        if segment.startswith(":") or (segment.startswith("{") and segment.endswith("}")):
            segments.append("{}")
        else:
            segments.append(segment)
    return "/" + "/".join(segments)


def media_type(value):
    return (value or "").split(";")[0].strip().lower()


def parameters_of(value):
    parts = [p.strip().lower().replace(" ", "") for p in (value or "").split(";")[1:]]
    return sorted(p for p in parts if p)


def match_content(content, content_type):
    """The `content` key matching a response's Content-Type: exact media type, and the same
    parameters when the key names parameters."""
    for key in content:
        if media_type(key) != media_type(content_type):
            continue
        wanted = parameters_of(key)
        if wanted and wanted != parameters_of(content_type):
            continue
        return key
    return None


def header_value(schema, raw):
    """A header's text as the value its schema expects."""
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "integer" in types:
        try:
            return int(raw.strip())
        except ValueError:
            return raw
    return raw


def error_status_map(spec):
    return spec.get("components", {}).get("schemas", {}).get("ErrorCode", {}).get("x-status", {})


def check_record(spec, schemas, record, problems, exercised):
    method = record["method"].lower()
    status = int(record["status"])
    headers = {k.lower(): v for k, v in (record.get("headers") or {}).items()}
    body = record.get("body") or ""
    note = record.get("note", "")
    where = f"{record['method']} {record['path']} → {status}" + (f" ({note})" if note else "")

    # Answers every route can give (unknown route, wrong method, …) are checked against `Error`.
    if record.get("generic"):
        check_error_body(spec, schemas, "/components/schemas/Error", body, status, headers, where, problems)
        exercised.add(("(any route)", "*", str(status)))
        return

    paths = spec.get("paths", {})
    if record["path"] not in paths:
        problems.add(where, f"path {record['path']!r} is not described in the document")
        return
    path_item, path_pointer = resolve(spec, paths[record["path"]], "/paths/" + pointer_escape(record["path"]))
    if method not in path_item:
        problems.add(where, f"method {method.upper()} is not described for {record['path']}")
        return
    operation = path_item[method]
    operation_pointer = f"{path_pointer}/{method}"
    responses = operation.get("responses", {})
    key = str(status) if str(status) in responses else (f"{str(status)[0]}XX" if f"{str(status)[0]}XX" in responses else None)
    if key is None:
        problems.add(
            where,
            f"status {status} is not listed for {method.upper()} {record['path']} (listed: {', '.join(sorted(responses))}); "
            f"body: {excerpt(body)}",
        )
        return
    exercised.add((record["path"], method, key))
    response, response_pointer = resolve(spec, responses[key], f"{operation_pointer}/responses/{key}")

    for name, header in (response.get("headers") or {}).items():
        header, header_pointer = resolve(spec, header, f"{response_pointer}/headers/{pointer_escape(name)}")
        raw = headers.get(name.lower())
        if raw is None:
            if header.get("required"):
                problems.add(where, f"required response header {name} is missing (got: {sorted(headers)})")
            continue
        if "schema" in header:
            for message in schemas.errors(f"{header_pointer}/schema", header_value(header["schema"], raw)):
                problems.add(where, f"header {name}: {raw!r} does not match its schema {message}")

    content = response.get("content")
    if not content:
        if body.strip():
            problems.add(where, f"the response is described without a body, but one came: {excerpt(body)}")
        return
    content_type = headers.get("content-type")
    if not content_type:
        problems.add(where, f"no Content-Type; the response lists {sorted(content)}")
        return
    content_key = match_content(content, content_type)
    if content_key is None:
        problems.add(where, f"Content-Type {content_type!r} is not among {sorted(content)}")
        return
    schema_pointer = f"{response_pointer}/content/{pointer_escape(content_key)}/schema"
    if "schema" not in content[content_key]:
        return
    if media_type(content_key) == "application/json" or media_type(content_key).endswith("+json"):
        try:
            instance = json.loads(body)
        except ValueError as error:
            problems.add(where, f"the body is not JSON ({error}): {excerpt(body)}")
            return
        if record["path"] != "/oauth/token":
            check_error_code_status(spec, instance, status, where, problems)
    else:
        instance = body
    for message in schemas.errors(schema_pointer, instance):
        problems.add(where, f"body does not match {schema_pointer.rsplit('/', 3)[0]} {message}\n  body: {excerpt(body)}")


def check_error_code_status(spec, instance, status, where, problems):
    if not (isinstance(instance, dict) and isinstance(instance.get("error"), dict)):
        return
    code = instance["error"].get("code")
    expected = error_status_map(spec).get(code)
    if expected is not None and int(expected) != status:
        problems.add(where, f"error code {code!r} comes with {expected} (ErrorCode x-status), not {status}")


def check_error_body(spec, schemas, pointer, body, status, headers, where, problems):
    if media_type(headers.get("content-type")) != "application/json":
        problems.add(where, f"an error answer must be application/json, got {headers.get('content-type')!r}")
    try:
        instance = json.loads(body)
    except ValueError as error:
        problems.add(where, f"the error body is not JSON ({error}): {excerpt(body)}")
        return
    for message in schemas.errors(pointer, instance):
        problems.add(where, f"error body does not match Error {message}\n  body: {excerpt(body)}")
    check_error_code_status(spec, instance, status, where, problems)
    if status in (429, 503) and "retry-after" not in headers:
        problems.add(where, "a 503 or 429 answer must carry Retry-After")


def command_spec(args):
    load_spec(args.doc)
    print(f"ok: {args.doc} is a valid OpenAPI 3.1 document")


def command_responses(args):
    spec = load_spec(args.doc)
    schemas = SchemaChecker(spec)
    with open(args.records, encoding="utf-8") as f:
        records = json.load(f)
    problems = Problems()
    exercised = set()
    for record in records:
        try:
            check_record(spec, schemas, record, problems, exercised)
        except Exception as error:  # a broken document must not hide behind a traceback
            problems.add(f"{record.get('method')} {record.get('path')} → {record.get('status')}", f"checker error: {error!r}")

    if args.routes:
        with open(args.routes, encoding="utf-8") as f:
            routes = json.load(f)
        described = {}
        for path, item in spec.get("paths", {}).items():
            item, _ = resolve(spec, item, "/paths/" + pointer_escape(path))
            described[normalise_template(path)] = {m for m in item if m in METHODS}
        for route in routes:
            key = normalise_template(route["path"])
            method = route["method"].lower()
            if key not in described:
                problems.add(f"route {route['method']} {route['path']}", "served by the gateway but not described in the document")
            elif method not in described[key]:
                problems.add(f"route {route['method']} {route['path']}", f"method not described (described: {sorted(described[key])})")

    summary = {}
    for path, method, key in sorted(exercised):
        summary.setdefault(f"{method.upper()} {path}", []).append(key)
    print(f"checked {len(records)} recorded answers against {args.doc}:")
    for operation, keys in summary.items():
        print(f"  {operation}: {', '.join(sorted(keys))}")
    problems.finish("responses", f"ok: every recorded answer matches {args.doc}")


# ---------------------------------------------------------------------------------------------
# Dashboards and alert rules


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
SELECTOR = re.compile(r"\b(token_gateway_[a-zA-Z0-9_]+)\b(\s*\{([^}]*)\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(by|without)\s*\(([^)]*)\)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels Prometheus adds when it scrapes (not in the exposition itself).
SCRAPE_LABELS = {"job", "instance"}


def parse_exposition(text):
    """Sample names → {label name → set of values}; families (from # TYPE) → type."""
    samples = {}
    families = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                families[parts[2]] = parts[3]
            continue
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        if not match:
            continue
        labels = samples.setdefault(match.group(1), {})
        for name, value in LABEL_PAIR.findall(match.group(3) or ""):
            labels.setdefault(name, set()).add(value)
    return samples, families


def family_of(sample, families):
    if sample in families:
        return sample
    for suffix in HISTOGRAM_SUFFIXES:
        if sample.endswith(suffix) and sample[: -len(suffix)] in families:
            return sample[: -len(suffix)]
    return sample


def check_expression(expr, where, samples, problems, used):
    selectors = SELECTOR.findall(expr)
    if not selectors:
        problems.add(where, f"expression uses no token_gateway_ metric: {expr}")
    names_here = []
    for name, _, matchers in selectors:
        used.add(name)
        names_here.append(name)
        if name not in samples:
            problems.add(where, f"metric {name} is not in the gateway's /metrics output")
            continue
        labels = samples[name]
        for label, op, value in MATCHER.findall(matchers or ""):
            if label in SCRAPE_LABELS or "$" in value:
                continue
            if label not in labels:
                problems.add(where, f"{name} has no label {label!r} (labels: {sorted(labels)})")
                continue
            observed = labels[label]
            if op == "=" and value not in observed:
                problems.add(where, f"{name}{{{label}={value!r}}}: no such value in /metrics (seen: {sorted(observed)})")
            if op == "=~" and not any(re.fullmatch(value, v) for v in observed):
                problems.add(where, f"{name}{{{label}=~{value!r}}}: matches no value in /metrics (seen: {sorted(observed)})")
    for _, grouping in GROUPING.findall(expr):
        for label in [g.strip() for g in grouping.split(",") if g.strip()]:
            if label in SCRAPE_LABELS:
                continue
            if label == "le":
                if not any(n.endswith("_bucket") for n in names_here):
                    problems.add(where, "grouping by le without a histogram _bucket series")
                continue
            if not any(label in samples.get(n, {}) for n in names_here):
                problems.add(where, f"groups by {label!r}, a label none of {sorted(set(names_here))} has")


def github_anchors(markdown):
    """The anchors GitHub makes for a Markdown file's headings."""
    anchors = set()
    counts = {}
    in_code = False
    for line in markdown.splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        text = re.sub(r"<[^>]+>", "", match.group(2))
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
        slug = re.sub(r"[^\w\- ]", "", text.lower().replace("`", "")).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def dashboard_panels(dashboard):
    for panel in dashboard.get("panels", []):
        yield panel
        for inner in panel.get("panels", []) or []:
            yield inner


def command_observability(args):
    problems = Problems()
    with open(args.metrics, encoding="utf-8") as f:
        samples, families = parse_exposition(f.read())
    with open(args.operations, encoding="utf-8") as f:
        operations = f.read()
    anchors = github_anchors(operations)
    used = set()

    # The dashboard.
    with open(args.dashboard, encoding="utf-8") as f:
        try:
            dashboard = json.load(f)
        except ValueError as error:
            print(f"FAILED observability: {args.dashboard} is not JSON: {error}", file=sys.stderr)
            sys.exit(1)
    for field in ("title", "uid", "schemaVersion", "panels"):
        if field not in dashboard:
            problems.add(args.dashboard, f"missing top-level field {field!r}")
    ids = set()
    expressions = 0
    for panel in dashboard_panels(dashboard):
        where = f"{args.dashboard} panel {panel.get('id')} {panel.get('title')!r}"
        for field in ("id", "type", "title", "gridPos"):
            if field not in panel:
                problems.add(where, f"missing field {field!r}")
        if panel.get("id") in ids:
            problems.add(where, "duplicate panel id")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets:
            problems.add(where, "no targets")
        ref_ids = set()
        for target in targets:
            if not target.get("expr"):
                problems.add(where, f"target {target.get('refId')!r} has no expr")
                continue
            if target.get("refId") in ref_ids or not target.get("refId"):
                problems.add(where, f"missing or duplicate refId {target.get('refId')!r}")
            ref_ids.add(target.get("refId"))
            expressions += 1
            check_expression(target["expr"], where, samples, problems, used)
    for family in args.require or []:
        if not any(family_of(name, families) == family for name in used):
            problems.add(args.dashboard, f"no panel shows {family}")

    # The alert rules.
    with open(args.alerts, encoding="utf-8") as f:
        try:
            alerts = yaml.safe_load(f)
        except yaml.YAMLError as error:
            print(f"FAILED observability: {args.alerts} is not YAML: {error}", file=sys.stderr)
            sys.exit(1)
    rules = 0
    groups = alerts.get("groups") if isinstance(alerts, dict) else None
    if not groups:
        problems.add(args.alerts, "no `groups`")
        groups = []
    for group in groups:
        if not group.get("name"):
            problems.add(args.alerts, "a group without a name")
        for rule in group.get("rules") or []:
            rules += 1
            name = rule.get("alert") or rule.get("record")
            where = f"{args.alerts} rule {name!r}"
            if not rule.get("expr"):
                problems.add(where, "no expr")
                continue
            check_expression(str(rule["expr"]), where, samples, problems, used)
            if "record" in rule:
                continue
            if rule.get("for") and not re.fullmatch(r"[0-9]+[smhd]", str(rule["for"])):
                problems.add(where, f"`for` {rule['for']!r} is not a Prometheus duration")
            if (rule.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
                problems.add(where, "labels.severity must be critical, warning or info")
            annotations = rule.get("annotations") or {}
            for field in ("summary", "description", "runbook_url"):
                if not annotations.get(field):
                    problems.add(where, f"annotations.{field} is missing")
            runbook = str(annotations.get("runbook_url", ""))
            match = re.search(r"Docs/operations\.md#([A-Za-z0-9_\-]+)$", runbook)
            if not match:
                problems.add(where, f"runbook_url {runbook!r} does not point at a heading of Docs/operations.md")
            elif match.group(1) not in anchors:
                problems.add(where, f"runbook_url anchor #{match.group(1)} is not a heading of {args.operations}")

    # The operations guide describes every family the gateway exports.
    for family in sorted(f for f in families if f.startswith("token_gateway_")):
        if family not in operations:
            problems.add(args.operations, f"metric family {family} is exported but not described")

    print(
        f"checked {expressions} dashboard expressions and {rules} alert rules against "
        f"{len(samples)} sample names of /metrics; metrics used: {', '.join(sorted(used))}"
    )
    problems.finish("observability", "ok: dashboards, alerts and the operations guide match /metrics")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("spec")
    p.add_argument("doc")
    p.set_defaults(run=command_spec)
    p = sub.add_parser("responses")
    p.add_argument("doc")
    p.add_argument("records")
    p.add_argument("--routes")
    p.set_defaults(run=command_responses)
    p = sub.add_parser("observability")
    p.add_argument("--metrics", required=True)
    p.add_argument("--dashboard", required=True)
    p.add_argument("--alerts", required=True)
    p.add_argument("--operations", required=True)
    p.add_argument("--require", nargs="*")
    p.set_defaults(run=command_observability)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
