#!/usr/bin/env python3
"""A stock OAuth 2.0 client (authlib's requests OAuth2Session) against token-gateway.

Driven by Tests/Integration/OAuthIntegrationTests.swift. It only talks to loopback, every HTTP call
has a timeout, and it prints one JSON object on stdout that the Swift test reads:

    {"library": "authlib 1.9.9", "status": 200, "headers": {...}, "token": {...} | null,
     "error": "invalid_client" | null, "error_description": "..." | null, "metadata": {...} | null}

Secrets come from the environment, never from the command line:
    OAUTH_CLIENT_SECRET  the client's secret (a configured caller's secret)
    OAUTH_SUBJECT_TOKEN  the Connect JWT for token exchange

Modes:
    client_credentials  fetch_token(grant_type="client_credentials", resource=...)
    token_exchange      fetch_token(grant_type=<RFC 8693>, subject_token=..., connect_method=..., connect_url=...)
    grant               fetch_token with any --grant-type (to see unsupported_grant_type)
    discovery           read /.well-known/oauth-authorization-server, validate it with authlib's RFC 8414
                        model, then fetch a client-credentials token from the token_endpoint it names
"""

import argparse
import json
import os
import sys
import urllib.parse

# The gateway under test listens on plain HTTP on loopback; authlib refuses http:// URLs unless told.
os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")

import authlib  # noqa: E402
import requests  # noqa: E402
from authlib.common.errors import AuthlibBaseError  # noqa: E402
from authlib.integrations.requests_client import OAuth2Session  # noqa: E402
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata  # noqa: E402

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
TIMEOUT = (5, 40)  # connect, read (seconds): the gateway's own deadline is 10 s
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def loopback_only(url):
    host = urllib.parse.urlsplit(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"refusing non-loopback URL host {host!r}")


def session(args, token_endpoint):
    auth_method = {"basic": "client_secret_basic", "post": "client_secret_post"}[args.auth]
    s = OAuth2Session(
        client_id=args.client_id,
        client_secret=os.environ.get("OAUTH_CLIENT_SECRET", ""),
        token_endpoint_auth_method=auth_method,
        token_endpoint=token_endpoint,
        default_timeout=TIMEOUT,
    )
    s.trust_env = False  # no proxies from the environment: loopback only
    return s


def fetch(s, url, captured, **params):
    """fetch_token, keeping the raw HTTP answer (status, headers) through a compliance hook."""

    def keep(resp):
        captured["status"] = resp.status_code
        captured["headers"] = {k.lower(): v for k, v in resp.headers.items()}
        try:
            captured["body"] = resp.json()
        except ValueError:
            captured["body"] = resp.text
        return resp

    s.register_compliance_hook("access_token_response", keep)
    token = s.fetch_token(url, **params)
    return dict(token)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateway", required=True, help="the gateway's base URL (loopback)")
    parser.add_argument("--mode", required=True, choices=["client_credentials", "token_exchange", "grant", "discovery"])
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--auth", default="basic", choices=["basic", "post"])
    parser.add_argument("--resource")
    parser.add_argument("--grant-type")
    parser.add_argument("--connect-method", default="GET")
    parser.add_argument("--connect-url")
    args = parser.parse_args()
    loopback_only(args.gateway)

    out = {
        "library": f"authlib {authlib.__version__}",
        "status": None,
        "headers": {},
        "token": None,
        "error": None,
        "error_description": None,
        "metadata": None,
    }
    captured = {}
    token_url = args.gateway.rstrip("/") + "/oauth/token"
    try:
        if args.mode == "discovery":
            r = requests.get(
                args.gateway.rstrip("/") + "/.well-known/oauth-authorization-server", timeout=TIMEOUT,
                proxies={"http": None, "https": None})
            r.raise_for_status()
            metadata = AuthorizationServerMetadata(r.json())
            # authlib's RFC 8414 checks that apply to a token-only server (response_types_supported
            # is checked by the Swift test: it is empty, as the gateway has no authorization endpoint).
            for check in (
                metadata.validate_issuer, metadata.validate_authorization_endpoint, metadata.validate_token_endpoint,
                metadata.validate_grant_types_supported, metadata.validate_token_endpoint_auth_methods_supported,
            ):
                check()
            out["metadata"] = dict(metadata)
            token_url = metadata["token_endpoint"]
            loopback_only(token_url)
            wanted = {"basic": "client_secret_basic", "post": "client_secret_post"}[args.auth]
            if wanted not in metadata["token_endpoint_auth_methods_supported"]:
                raise SystemExit(f"{wanted} is not advertised")
            out["token"] = fetch(
                session(args, token_url), token_url, captured, grant_type="client_credentials", resource=args.resource)
        elif args.mode == "client_credentials":
            out["token"] = fetch(
                session(args, token_url), token_url, captured, grant_type="client_credentials", resource=args.resource)
        elif args.mode == "token_exchange":
            params = dict(
                grant_type=TOKEN_EXCHANGE,
                subject_token=os.environ.get("OAUTH_SUBJECT_TOKEN", ""),
                subject_token_type=JWT_TYPE,
                connect_method=args.connect_method,
                connect_url=args.connect_url,
            )
            if args.resource:
                params["resource"] = args.resource
            out["token"] = fetch(session(args, token_url), token_url, captured, **params)
        else:
            out["token"] = fetch(
                session(args, token_url), token_url, captured, grant_type=args.grant_type, resource=args.resource)
    except AuthlibBaseError as e:  # an RFC 6749 error answer, parsed by authlib
        out["error"] = e.error
        out["error_description"] = e.description
    except requests.HTTPError as e:  # authlib raises the HTTP error of a 5xx answer
        body = captured.get("body")
        if isinstance(body, dict):
            out["error"] = body.get("error")
            out["error_description"] = body.get("error_description")
        out["http_error"] = str(e.response.status_code if e.response is not None else "")
    out["status"] = captured.get("status")
    out["headers"] = captured.get("headers", {})
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
