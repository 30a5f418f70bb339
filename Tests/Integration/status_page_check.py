#!/usr/bin/env python3
"""Drives the operator status page of a running gateway in headless Chromium (Selenium).

Run by StatusPageBrowserTests with one argument, a JSON object:
  {"base": "http://127.0.0.1:PORT", "operator": "name", "secret": "…",
   "failing": "<installation ARI>", "healthy": "<installation ARI>",
   "forbidden": ["text that must never appear", …], "screenshots": "/tmp/dir",
   "chromium": "/usr/bin/chromium", "chromedriver": "/usr/bin/chromedriver"}

It logs in with HTTP Basic credentials, checks that the failing installation is listed first with
its circuit open, opens its page, compares every number shown with the JSON API (`/v1/status`,
`/v1/installations/{id}/history`, read with the same operator as Bearer), checks accessibility
(landmarks, heading order, form labels, table headers, `lang`, text alternatives of images and
SVG, WCAG contrast of the text colours in use) at 1280 px and 390 px, checks that nothing is
fetched from elsewhere and nothing secret is shown, and saves screenshots (paths printed).
Prints `ok` and exits 0 when every check holds; otherwise prints each failure and exits 1.
"""

import base64
import json
import os
import re
import signal
import sys
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

FAILURES = []


def check(condition, message):
    if not condition:
        FAILURES.append(message)
    return condition


def api(args, path):
    request = urllib.request.Request(args["base"] + path, headers={"Authorization": "Bearer " + args["secret"]})
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read().decode("utf-8"))


def short_id(ari):
    return ari.rsplit("/", 1)[-1]


# --- WCAG 2.x contrast ---------------------------------------------------------------------------

def parse_rgb(text):
    """`rgb(r, g, b)` / `rgba(r, g, b, a)` (computed CSS colours) to (r, g, b, a)."""
    numbers = [float(n) for n in re.findall(r"[\d.]+", text)]
    if len(numbers) == 3:
        numbers.append(1.0)
    return tuple(numbers[:4]) if len(numbers) >= 4 else None


def luminance(rgb):
    def channel(c):
        c = c / 255.0
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(foreground, background):
    a, b = luminance(foreground), luminance(background)
    lighter, darker = max(a, b), min(a, b)
    return (lighter + 0.05) / (darker + 0.05)


COLOURS_JS = """
const out = [];
function background(el) {
  for (let e = el; e; e = e.parentElement) {
    const c = getComputedStyle(e).backgroundColor;
    const m = c.match(/[\\d.]+/g);
    if (m && (m.length < 4 || parseFloat(m[3]) > 0)) return c;
  }
  return 'rgb(255, 255, 255)';
}
for (const el of document.querySelectorAll('body *')) {
  const own = Array.from(el.childNodes).some(n => n.nodeType === 3 && n.textContent.trim().length > 0);
  if (!own) continue;
  const s = getComputedStyle(el);
  if (s.visibility === 'hidden' || s.display === 'none') continue;
  const svgText = el instanceof SVGElement;
  out.push({tag: el.tagName, text: el.textContent.trim().slice(0, 40),
            color: svgText ? s.fill : s.color, background: background(svgText ? el.ownerSVGElement.parentElement : el)});
}
return out;
"""


def check_contrast(driver, where):
    pairs = driver.execute_script(COLOURS_JS)
    check(len(pairs) > 10, f"{where}: too few text elements found for the contrast check ({len(pairs)})")
    seen = {}
    for p in pairs:
        fg, bg = parse_rgb(p["color"]), parse_rgb(p["background"])
        if fg is None or bg is None:
            check(False, f"{where}: unreadable colour {p}")
            continue
        ratio = contrast(fg, bg)
        seen[(p["color"], p["background"])] = ratio
        check(ratio >= 4.5, f"{where}: contrast {ratio:.2f}:1 < 4.5:1 for <{p['tag']}> {p['text']!r} "
                            f"({p['color']} on {p['background']})")
    worst = min(seen.values()) if seen else 0
    print(f"{where}: {len(seen)} colour pairs in use, lowest contrast {worst:.2f}:1")


# --- Structure and accessibility -----------------------------------------------------------------

STRUCTURE_JS = """
const r = {};
r.lang = document.documentElement.getAttribute('lang');
r.title = document.title;
r.mains = document.querySelectorAll('main').length;
r.navs = document.querySelectorAll('nav').length;
r.navLabels = Array.from(document.querySelectorAll('nav')).map(n => n.getAttribute('aria-label'));
r.headings = Array.from(document.querySelectorAll('h1,h2,h3,h4,h5,h6')).map(h => [parseInt(h.tagName[1]), h.textContent.trim()]);
r.unlabelled = Array.from(document.querySelectorAll('input,select,textarea')).filter(el => {
  if (el.type === 'hidden') return false;
  if (el.getAttribute('aria-label')) return false;
  if (el.closest('label')) return false;
  return !(el.id && document.querySelector('label[for="' + el.id + '"]'));
}).map(el => el.outerHTML.slice(0, 80));
r.tables = Array.from(document.querySelectorAll('table')).map(t => ({
  id: t.id, colHeaders: t.querySelectorAll('thead th[scope="col"]').length,
  firstRowCells: t.rows.length ? t.rows[0].cells.length : 0}));
r.imgsWithoutAlt = Array.from(document.querySelectorAll('img')).filter(i => !i.hasAttribute('alt')).length;
r.svgs = Array.from(document.querySelectorAll('svg')).map(s => {
  const ids = (s.getAttribute('aria-labelledby') || '').split(/\\s+/).filter(Boolean);
  const text = ids.map(id => (document.getElementById(id) || {}).textContent || '').join(' ').trim();
  return {role: s.getAttribute('role'), label: text || s.getAttribute('aria-label') || ''};
});
r.scripts = document.querySelectorAll('script').length;
r.resources = performance.getEntriesByType('resource').map(e => e.name);
r.scrollWidth = document.documentElement.scrollWidth;
r.innerWidth = window.innerWidth;
return r;
"""


def check_structure(driver, where, args):
    s = driver.execute_script(STRUCTURE_JS)
    check(s["lang"] == "en", f"{where}: <html lang> is {s['lang']!r}")
    check(bool(s["title"]), f"{where}: no <title>")
    check(s["mains"] == 1, f"{where}: {s['mains']} <main> landmarks")
    check(s["navs"] >= 1 and all(s["navLabels"]), f"{where}: <nav> landmarks missing or unlabelled: {s['navLabels']}")
    levels = [h[0] for h in s["headings"]]
    check(levels and levels[0] == 1 and levels.count(1) == 1, f"{where}: headings must start with one h1: {levels}")
    for previous, current in zip(levels, levels[1:]):
        check(current <= previous + 1, f"{where}: heading level jumps from h{previous} to h{current}")
    check(not s["unlabelled"], f"{where}: form controls without a label: {s['unlabelled']}")
    for t in s["tables"]:
        check(t["colHeaders"] > 0 and t["colHeaders"] == t["firstRowCells"],
              f"{where}: table {t['id']!r} lacks column headers ({t})")
    check(s["imgsWithoutAlt"] == 0, f"{where}: <img> without alt")
    check(len(s["svgs"]) >= 1, f"{where}: no chart")
    for svg in s["svgs"]:
        check(svg["role"] == "img" and len(svg["label"]) > 10, f"{where}: SVG without role=img and a text alternative: {svg}")
    check(s["scripts"] == 0, f"{where}: the page carries {s['scripts']} <script> elements")
    origin = args["base"]
    foreign = [u for u in s["resources"] if not u.startswith(origin)]
    check(not foreign, f"{where}: resources fetched from elsewhere: {foreign}")
    check(s["scrollWidth"] <= s["innerWidth"] + 1,
          f"{where}: the page scrolls sideways ({s['scrollWidth']} px content in a {s['innerWidth']} px window)")
    source = driver.page_source
    check(not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", source),
          f"{where}: the page refers to another origin")
    for secret in args["forbidden"]:
        check(secret not in source, f"{where}: the page shows something secret ({secret[:12]}…)")
    return s


def set_width(driver, width):
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": 900 if width > 600 else 844, "deviceScaleFactor": 1,
                            "mobile": width < 600})


def wait_for_page(driver, url_part):
    """Waits (at most 20 s) until the page at a URL containing `url_part` has loaded."""
    WebDriverWait(driver, 20).until(
        lambda d: url_part in d.current_url and d.execute_script("return document.readyState") == "complete")


def screenshot(driver, args, name, width):
    """Saves the whole page (the viewport made as tall as the page, at most 4000 px)."""
    path = os.path.join(args["screenshots"], name)
    height = min(int(driver.execute_script("return document.documentElement.scrollHeight")), 4000)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    driver.save_screenshot(path)
    set_width(driver, width)
    print(f"screenshot: {path}")


# --- The checks ----------------------------------------------------------------------------------

def text(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css).text.strip()


def check_overview(driver, args, status, history, where):
    rows = driver.find_elements(By.CSS_SELECTOR, "table#installations tbody tr[data-installation]")
    check(len(rows) >= 2, f"{where}: {len(rows)} installation rows")
    if not rows:
        return
    first = rows[0]
    check(first.get_attribute("data-installation") == args["failing"],
          f"{where}: first row is {first.get_attribute('data-installation')}, not the failing installation")
    check("circuit open" in first.text, f"{where}: the failing installation's row does not say 'circuit open': {first.text!r}")
    state = history["installation"]
    cell = lambda field: first.find_element(By.CSS_SELECTOR, f'[data-field="{field}"]').text.strip()
    check(cell("failures") == str(state["consecutiveFailures"]),
          f"{where}: failures {cell('failures')!r} vs API {state['consecutiveFailures']}")
    check(state["circuitOpenUntil"] is not None and cell("circuit") == state["circuitOpenUntil"],
          f"{where}: circuit open until {cell('circuit')!r} vs API {state['circuitOpenUntil']}")
    check(cell("key") == (state["triggerKeyId"] or "—"), f"{where}: key id {cell('key')!r} vs API {state['triggerKeyId']}")
    last = state["lastRoundTrip"]
    check(last is not None and cell("last-round-trip") == f"{last['outcome']} {last['durationMs']} ms",
          f"{where}: last round trip {cell('last-round-trip')!r} vs API {last}")
    check(cell("trigger") == ("registered" if state["triggerRegistered"] else "none"), f"{where}: trigger cell")
    healthy = [r for r in rows if r.get_attribute("data-installation") == args["healthy"]]
    check(len(healthy) == 1 and healthy[0].find_element(By.CSS_SELECTOR, "td .badge").text.strip() == "ok",
          f"{where}: the healthy installation is not listed as ok")

    # Summary numbers equal the API's.
    check(text(driver, "#summary-replicas") == str(len(status["replicas"])),
          f"{where}: replicas {text(driver, '#summary-replicas')} vs API {len(status['replicas'])}")
    check(text(driver, "#summary-round-trips") == str(status["roundTrips"]["total"]),
          f"{where}: round trips {text(driver, '#summary-round-trips')} vs API {status['roundTrips']['total']}")
    check(text(driver, "#summary-open-circuits") == str(len(status["openCircuits"])),
          f"{where}: open circuits {text(driver, '#summary-open-circuits')} vs API {len(status['openCircuits'])}")
    check(text(driver, "#summary-exchanges-used") == str(status["userExchanges"]["used"]),
          f"{where}: exchanges used vs API {status['userExchanges']['used']}")
    check(text(driver, "#summary-expiring") == str(len(status["expiringWithoutTrigger"])),
          f"{where}: expiring without trigger vs API")
    shown = {li.get_attribute("data-outcome"): int(li.find_element(By.CSS_SELECTOR, ".count").text)
             for li in driver.find_elements(By.CSS_SELECTOR, "#outcomes li[data-outcome]")}
    check(shown == status["roundTrips"]["byOutcome"], f"{where}: outcomes {shown} vs API {status['roundTrips']['byOutcome']}")
    check(status["roundTrips"]["byOutcome"].get("success", 0) >= 1, f"{where}: no successful round trip counted")
    check(sum(v for k, v in shown.items() if k != "success") >= 1, f"{where}: no failed round trip counted")
    replica_ids = [c.text.strip() for c in driver.find_elements(By.CSS_SELECTOR, "table#replicas tbody td.id")]
    check(replica_ids == [r["id"] for r in status["replicas"]], f"{where}: replicas {replica_ids} vs API")


def check_installation(driver, args, history, where):
    rows = driver.find_elements(By.CSS_SELECTOR, "table#round-trips tbody tr")
    api_rows = history["roundTrips"]
    check(len(api_rows) >= 1, f"{where}: the API lists no round trip")
    check(len(rows) == len(api_rows), f"{where}: {len(rows)} rows vs {len(api_rows)} in the API")
    for row, entry in zip(rows, api_rows):
        cell = lambda field: row.find_element(By.CSS_SELECTOR, f'[data-field="{field}"]').text.strip()
        check(cell("started") == entry["startedAt"], f"{where}: started {cell('started')} vs {entry['startedAt']}")
        check(cell("outcome") == entry["outcome"], f"{where}: outcome {cell('outcome')} vs {entry['outcome']}")
        check(cell("duration") == f"{entry['durationMs']} ms", f"{where}: duration {cell('duration')} vs {entry['durationMs']}")
        check(cell("attempts") == str(entry["attempts"]), f"{where}: attempts {cell('attempts')} vs {entry['attempts']}")
        check(cell("replica") == entry["replica"], f"{where}: replica {cell('replica')} vs {entry['replica']}")
    check(all(e["outcome"] != "success" for e in api_rows), f"{where}: the failing installation has a successful round trip")
    state = history["installation"]
    fact = lambda field: driver.find_element(By.CSS_SELECTOR, f'#facts [data-field="{field}"]').text.strip()
    check(fact("failures") == str(state["consecutiveFailures"]), f"{where}: failures fact vs API")
    check(fact("circuit") == state["circuitOpenUntil"], f"{where}: circuit fact {fact('circuit')} vs API {state['circuitOpenUntil']}")
    check(fact("installation") == args["failing"], f"{where}: installation fact")


def stop_on_signal(signum, frame):
    """SIGTERM or SIGHUP: leave through `finally`, so that chromedriver and Chromium stop too."""
    raise SystemExit(128 + signum)


def main():
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop_on_signal)
    args = json.loads(sys.argv[1])
    os.makedirs(args["screenshots"], exist_ok=True)
    status = api(args, "/v1/status")
    failing_path = urllib.parse.quote(args["failing"], safe="")
    history = api(args, f"/v1/installations/{failing_path}/history")

    options = Options()
    options.binary_location = args["chromium"]
    # Nothing but loopback: no host name resolves except 127.0.0.1 and localhost, and Chromium's own
    # background traffic (component updates, sync, metrics uploads, default apps) stays off.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--metrics-recording-only",
                 "--disable-default-apps",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost"):
        options.add_argument(flag)
    driver = None
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=args["chromedriver"]))
        driver.set_page_load_timeout(30)
        credentials = base64.b64encode(f"{args['operator']}:{args['secret']}".encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": "Basic " + credentials}})

        for width in (1280, 390):
            where = f"/status at {width} px"
            set_width(driver, width)
            driver.get(args["base"] + "/status")
            check(driver.find_element(By.TAG_NAME, "h1").text.strip() == "Status", f"{where}: not the status page")
            check_structure(driver, where, args)
            check_contrast(driver, where)
            check_overview(driver, args, status, history, where)
            screenshot(driver, args, f"status-{width}.png", width)

            # The filter form narrows the table to the failing installation.
            where = f"/status filtered at {width} px"
            field = driver.find_element(By.ID, "filter-q")
            field.clear()
            field.send_keys(short_id(args["failing"]))
            driver.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
            wait_for_page(driver, "q=" + short_id(args["failing"]))
            rows = driver.find_elements(By.CSS_SELECTOR, "table#installations tbody tr[data-installation]")
            check([r.get_attribute("data-installation") for r in rows] == [args["failing"]],
                  f"{where}: filter by id shows {len(rows)} rows")

            # Open the failing installation's page from its row.
            where = f"installation page at {width} px"
            rows[0].find_element(By.CSS_SELECTOR, "a").click()
            wait_for_page(driver, "/status/installations/" + short_id(args["failing"]))
            check(short_id(args["failing"]) in driver.current_url, f"{where}: link led to {driver.current_url}")
            check_structure(driver, where, args)
            check_contrast(driver, where)
            check_installation(driver, args, history, where)
            screenshot(driver, args, f"installation-{width}.png", width)
    finally:
        if driver is not None:
            driver.quit()

    if FAILURES:
        for failure in FAILURES:
            print("FAIL: " + failure)
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
