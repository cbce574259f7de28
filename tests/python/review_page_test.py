#!/usr/bin/env python3
"""Browser test of the legal review page, in real headless Chromium (Debian's, through Selenium and
Debian's matching chromedriver).

    python tests/python/review_page_test.py --url http://127.0.0.1:PORT/ --queries-dir DIR \\
        --grpc HOST:PORT --screenshot /tmp/review.png

Steps (the DOM contract is the one the page promises: section.query[data-query-id][data-state],
.state, h2, .diff, button[data-action], #message[data-kind], table#audit tr[data-audit-id], ...):
  1. the page shows only the token form; sign in as demo-legal-token; every query of
     /api/allowlist has its section with the same state, a state badge and a title; contract
     elements are there; screenshot to --screenshot;
  2. edit the query's file in --queries-dir (k = N -> k = N+2, which changes its canonical
     content; a k that an earlier run already approved is skipped for N+3, ...); reload until the
     page shows it as data-state="changed" with a .diff (20 s);
  3. over gRPC (the cleanroom_client package, clients/python) running it as demo-sakura-token is now
     FAILED_PRECONDITION;
  4. sign out, sign in as demo-sakura-token: #message[data-kind=error], no query shown, and an
     approval posted with that token is refused; the query is still `changed`;
  5. sign in as demo-legal-token, click the query's button[data-action="approve"], wait for
     data-state="approved"; over gRPC it runs again with the new k; screenshot PATH-after-approve;
     the audit table has an ApproveQuery row for it.
The query file is put back as it was at the end (unless --keep-edit).

--no-grpc skips the gRPC checks and the file edit (for a page server, such as a mock, that is not
backed by the service); the page must then already show the query as `changed`.

Prints each step as it passes; stops at the first failure with a clear message, a screenshot
PATH-failure.png, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import sys
import tempfile
import time
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

sys.dont_write_bytecode = True  # no __pycache__ under tests/python
LEGAL = "demo-legal-token"  # sample data only
SAKURA = "demo-sakura-token"
WINDOW = {"start": "2025-11-01", "end": "2026-11-01"}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
]


class StepFailed(Exception):
    pass


def fail(message: str):
    raise StepFailed(message)


def expect(condition, message: str):
    if not condition:
        fail(message)


class Steps:
    def __init__(self):
        self.passed = 0

    def ok(self, text: str):
        self.passed += 1
        print(f"ok   {self.passed:2d}. {text}", flush=True)


# ---------------------------------------------------------------------------------------------
# The review API over plain HTTP (to know what the page should show)


# Set from --ca: the context that trusts the service's CA for https:// URLs.
TLS_CONTEXT = None


def api(base_url: str, token: str, path: str, method: str = "GET", body=None):
    """Returns (status, parsed JSON or None)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(urljoin(base_url, path), data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30, context=TLS_CONTEXT) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    except urllib.error.URLError as error:
        fail(f"{method} {path}: the page server at {base_url} cannot be reached: {error.reason}")
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, None


def allowlist(base_url: str) -> dict:
    status, data = api(base_url, LEGAL, "/api/allowlist")
    expect(status == 200 and isinstance(data, dict) and isinstance(data.get("queries"), list),
           f"GET /api/allowlist as legal answered {status}: {data!r}")
    return data


def query_json(base_url: str, query_id: str) -> dict:
    for q in allowlist(base_url)["queries"]:
        if q.get("id") == query_id:
            return q
    fail(f"/api/allowlist has no query {query_id}")


# ---------------------------------------------------------------------------------------------
# The browser


def start_browser(chromium: str, chromedriver: str, spki: str | None = None):
    for path in (chromium, chromedriver):
        expect(os.access(path, os.X_OK), f"{path} not found or not executable (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    profile = tempfile.mkdtemp(prefix="review-page-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # Over HTTPS the browser trusts exactly the service's key (SPKI pin), nothing else.
    pin = [f"--ignore-certificate-errors-spki-list={spki}"] if spki else []
    for flag in CHROMIUM_FLAGS + pin + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    except WebDriverException as error:
        shutil.rmtree(profile, ignore_errors=True)
        fail(f"Chromium did not start through {chromedriver}: {error.msg}")
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver, profile


def screenshot(driver, path: str):
    """Full-page PNG through the DevTools protocol (WebDriver's own screenshot is the viewport)."""
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
    })
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(base64.b64decode(shot["data"]))
    return int(size["width"]), int(size["height"])


def suffixed(path: str, suffix: str) -> str:
    p = Path(path)
    return str(p.with_name(p.stem + suffix + (p.suffix or ".png")))


def wait_for(what: str, fn, timeout: float = 10.0, interval: float = 0.2):
    """Polls fn until it returns something truthy; fails with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except StaleElementReferenceException as error:  # the page re-rendered under us
            last_error = error
        if time.monotonic() >= deadline:
            fail(f"timed out after {timeout:g} s waiting for {what}" + (f" ({last_error})" if last_error else ""))
        time.sleep(interval)


# One atomic read of what the page shows, so a re-render cannot split it.
PAGE_STATE_JS = r"""
function shown(e) { return !!e && !e.closest('[hidden]') && e.getClientRects().length > 0; }
function text(sec, sel) { var e = sec.querySelector(sel); return e ? e.textContent.trim() : null; }
var msg = document.getElementById('message');
var form = document.getElementById('token');
var sections = Array.prototype.map.call(document.querySelectorAll('section.query'), function (sec) {
  var diff = sec.querySelector('.diff');
  return {
    id: sec.getAttribute('data-query-id'), state: sec.getAttribute('data-state'), shown: shown(sec),
    badge: text(sec, '.state'), title: text(sec, 'h2'), title_ja: text(sec, '.title-ja'),
    description: text(sec, '.description'), description_ja: text(sec, '.description-ja'),
    has: ['.purposes', '.clause', '.partners', '.parameters', '.outputs', '.effective-k',
          'details.sql', 'details.sql pre', '.history', '.diff',
          'button[data-action="approve"]', 'button[data-action="reject"]'].filter(function (s) {
      return !!sec.querySelector(s);
    }),
    diff_ins: diff ? diff.querySelectorAll('.ins').length : 0,
    diff_del: diff ? diff.querySelectorAll('.del').length : 0,
    partners_text: text(sec, '.partners')
  };
});
var approveShown = Array.prototype.filter.call(
  document.querySelectorAll('button[data-action="approve"]'), shown).length;
var audit = Array.prototype.map.call(document.querySelectorAll('table#audit tbody tr[data-audit-id]'), function (tr) {
  return { id: tr.getAttribute('data-audit-id'), shown: shown(tr),
           cells: Array.prototype.map.call(tr.cells, function (td) { return (td.innerText || td.textContent).trim(); }) };
});
return {
  form_shown: shown(form), login_shown: shown(document.querySelector('button#login')),
  logout_shown: shown(document.querySelector('button#logout')),
  viewer: (document.getElementById('viewer') || {}).innerText || '',
  message_kind: msg ? msg.getAttribute('data-kind') : null, message: msg ? msg.textContent.trim() : null,
  token_stored: (function () { try { return sessionStorage.getItem('cleanroom-token'); } catch (e) { return 'ERR'; } })(),
  sections: sections, approve_shown: approveShown, audit: audit,
  resources: performance.getEntriesByType('resource').map(function (r) { return r.name; }),
  origin: location.origin
};
"""


def page_state(driver) -> dict:
    return driver.execute_script(PAGE_STATE_JS)


def section(state: dict, query_id: str):
    return next((s for s in state["sections"] if s["id"] == query_id), None)


def login(driver, token: str):
    form = wait_for("the token form (input#token)", lambda: page_state(driver)["form_shown"])
    expect(form, "no token form")
    field = driver.find_element(By.CSS_SELECTOR, "input#token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "button#login").click()


def wait_rendered(driver, expected_ids: list[str], timeout: float = 15.0) -> dict:
    """Waits until every expected query has a shown section (or the page reports an error)."""
    def ready():
        state = page_state(driver)
        shown = {s["id"] for s in state["sections"] if s["shown"]}
        if state["message_kind"] == "error" and not shown:
            fail(f"the page shows an error instead of the allow-list: {state['message']!r}")
        return state if set(expected_ids) <= shown else None
    return wait_for(f"sections for {', '.join(expected_ids)}", ready, timeout)


def check_sections(state: dict, queries: list[dict]) -> str:
    """Every query of the API has one shown section with its state, badge, title and the contract's
    elements; no section for a query the API does not list."""
    api_ids = [q["id"] for q in queries]
    page_ids = [s["id"] for s in state["sections"]]
    expect(sorted(page_ids) == sorted(api_ids), f"sections {page_ids} != /api/allowlist queries {api_ids}")
    counts: dict[str, int] = {}
    for q in queries:
        s = section(state, q["id"])
        where = f"section[data-query-id={q['id']}]"
        expect(s["shown"], f"{where} is not visible")
        expect(s["state"] == q["state"], f"{where} has data-state={s['state']!r}, the API says {q['state']!r}")
        expect(s["badge"] == q["state"], f"{where} .state badge reads {s['badge']!r}, expected {q['state']!r}")
        expect(s["title"], f"{where} has no h2 title")
        expect(q.get("title") in s["title"], f"{where} h2 {s['title']!r} does not show the title {q.get('title')!r}")
        if q.get("title_ja"):
            expect(s["title_ja"] and q["title_ja"] in s["title_ja"], f"{where} .title-ja missing or wrong: {s['title_ja']!r}")
        if (q.get("description") or "").strip():
            expect(s["description"], f"{where} has no .description")
        if (q.get("description_ja") or "").strip():
            expect(s["description_ja"], f"{where} has no .description-ja")
        needed = [".purposes", ".clause", ".partners", ".outputs", ".effective-k", "details.sql",
                  "details.sql pre", ".history"]
        if q.get("parameters"):
            needed.append(".parameters")
        if q["state"] != "invalid":
            needed += ['button[data-action="approve"]', 'button[data-action="reject"]']
        missing = [n for n in needed if n not in s["has"]]
        expect(not missing, f"{where} lacks {', '.join(missing)}")
        for p in q.get("partners") or []:
            expect(str(p.get("effective_k")) in (s["partners_text"] or ""),
                   f"{where} .partners does not show {p.get('id')}'s effective k {p.get('effective_k')}")
            if p.get("period_days"):
                # A lawyer reads the guarantee the contract buys beside the partner's terms.
                days = f"per {p['period_days']} days"
                expect(days in (s["partners_text"] or "") and "\u03b5 = " in (s["partners_text"] or ""),
                       f"{where} .partners does not show {p.get('id')}'s (epsilon, delta) {days}")
        if q.get("diff"):
            expect(".diff" in s["has"], f"{where}: the API has a diff but the page shows no .diff")
            lines = (q["diff"].get("sql") or []) + (q["diff"].get("metadata") or [])
            if any(line.get("op") == "insert" for line in lines):
                expect(s["diff_ins"] > 0, f"{where} .diff has no .ins line")
            if any(line.get("op") == "delete" for line in lines):
                expect(s["diff_del"] > 0, f"{where} .diff has no .del line")
        else:
            expect(".diff" not in s["has"], f"{where} shows a .diff although the API has none")
        counts[q["state"]] = counts.get(q["state"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def click_approve(driver, query_id: str, note: str):
    def attempt():
        sec = driver.find_element(By.CSS_SELECTOR, f'section.query[data-query-id="{query_id}"]')
        notes = sec.find_elements(By.CSS_SELECTOR, 'input[name="note"]')
        if notes:
            notes[0].clear()
            notes[0].send_keys(note)
        button = sec.find_element(By.CSS_SELECTOR, 'button[data-action="approve"]')
        expect(button.is_enabled(), f"the approve button of {query_id} is disabled")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
        button.click()
        return True
    wait_for(f"a clickable approve button for {query_id}", attempt, timeout=10)


POST_JS = r"""
var done = arguments[arguments.length - 1];
fetch(arguments[0], {method: 'POST', headers: {'Authorization': 'Bearer ' + arguments[1],
      'Content-Type': 'application/json', 'Accept': 'application/json'}, body: JSON.stringify(arguments[2])})
  .then(function (r) { return r.text().then(function (t) { done({status: r.status, body: t}); }); },
        function (e) { done({status: 0, body: String(e)}); });
"""


def console_errors(driver) -> list[str]:
    try:
        entries = driver.get_log("browser")
    except WebDriverException:
        return []
    # Refused API calls (401/403) show up as "Failed to load resource"; those are expected.
    return [e["message"] for e in entries
            if e.get("level") == "SEVERE" and "Failed to load resource" not in e.get("message", "")]


# ---------------------------------------------------------------------------------------------
# The query file and gRPC


def find_query_file(queries_dir: Path, query_id: str) -> Path:
    candidate = queries_dir / f"{query_id}.toml"
    if candidate.is_file():
        return candidate
    for path in sorted(queries_dir.glob("*.toml")):
        if re.search(rf'^id\s*=\s*"{re.escape(query_id)}"\s*$', path.read_text(encoding="utf-8"), re.M):
            return path
    fail(f"no file for query {query_id} in {queries_dir}")


def edit_k(base: str, path: Path, query_id: str, restore: list, timeout: float) -> tuple[int, int, list]:
    """Raises the query's own k (a change to its canonical content) until the service shows a
    version that no approval covers yet: a k approved by an earlier run of this test would read as
    `approved` again, so that k is skipped. The original text goes on `restore` before any write.
    Returns the old k, the new k and the skipped (k, state) pairs."""
    original = path.read_text(encoding="utf-8")
    match = re.search(r"^k\s*=\s*(\d+)\s*$", original, re.M)
    expect(match, f"{path} has no top-level `k = N` line to edit")
    old_k = int(match.group(1))
    original_sha = query_json(base, query_id)["content_sha256"]
    restore.append((path, original))
    skipped = []
    for new_k in range(old_k + 2, old_k + 22):
        path.write_text(original[: match.start()] + f"k = {new_k}" + original[match.end():], encoding="utf-8")

        def picked_up():
            q = query_json(base, query_id)
            return q if q["content_sha256"] not in (original_sha, *(sha for _, _, sha in skipped)) else None

        q = wait_for(f"the service to pick up {path.name} with k = {new_k} (its content_sha256 to change)",
                     picked_up, timeout=timeout, interval=0.5)
        if q["state"] == "changed":
            return old_k, new_k, [(k, state) for k, state, _ in skipped]
        skipped.append((new_k, q["state"], q["content_sha256"]))
    fail(f"no k in {old_k + 2}..{old_k + 21} gives {query_id} a `changed` state: {skipped}")


def grpc_client(address: str, token: str, ca: str | None = None):
    """The partner's client (pip install ./clients/python) and the package itself."""
    import cleanroom_client  # noqa: PLC0415 - only with gRPC on

    return cleanroom_client, cleanroom_client.Client.connect(address, token, ca_file=ca)


def run_params(cc, description) -> dict:
    """Typed parameters for every declared one: the window for dates, the first allowed value of
    an enum (built once, so the same request runs before and after the edit)."""
    raw = {}
    for spec in description.parameters:
        if spec.type == "date" and spec.name in WINDOW:
            raw[spec.name] = WINDOW[spec.name]
        elif spec.type == "enum" and spec.allowed_values:
            raw[spec.name] = spec.allowed_values[0]
        else:
            fail(f"{description.id}: no test value for parameter {spec.name} ({spec.type})")
    return cc.build_params(description, raw)


# ---------------------------------------------------------------------------------------------
# The test


def run(args, steps: Steps, driver, restore: list):
    base = args.url if args.url.endswith("/") else args.url + "/"
    qid = args.query
    use_grpc = not args.no_grpc

    data = allowlist(base)
    queries = data["queries"]
    ids = [q["id"] for q in queries]
    expect(qid in ids, f"/api/allowlist has no query {qid} (it lists {ids})")
    steps.ok(f"GET /api/allowlist as legal: {len(queries)} queries, viewer {data.get('viewer')}")

    sakura = cc = params = None
    if use_grpc:
        cc, sakura = grpc_client(args.grpc, SAKURA, args.ca)
        target = next(q for q in queries if q["id"] == qid)
        expect(target["state"] == "approved",
               f"{qid} must start approved (the demo approves every query); it is {target['state']!r}")
        description = sakura.describe_query(qid)
        params = run_params(cc, description)
        answer = sakura.run_with(qid, params)
        steps.ok(f"gRPC: {qid} runs as {SAKURA} before the edit ({answer.released_rows} rows, "
                 f"k={answer.effective_k}, {answer.audit_id})")

    # 1. The page, signed out, then as the legal reviewer.
    driver.get(base)
    state = wait_for("the token form", lambda: (lambda s: s if s["form_shown"] else None)(page_state(driver)))
    expect(not any(s["shown"] for s in state["sections"]), "the page shows queries before sign-in")
    foreign = [r for r in state["resources"] if not r.startswith(state["origin"])]
    expect(not foreign, f"the page loads resources from elsewhere: {foreign}")
    steps.ok("signed out: the page shows only the token form, and loads nothing from another origin")

    login(driver, LEGAL)
    state = wait_rendered(driver, ids)
    expect(state["token_stored"] == LEGAL, f"sessionStorage['cleanroom-token'] holds {state['token_stored']!r}")
    expect("legal" in state["viewer"].lower(), f"#viewer does not show the legal role: {state['viewer']!r}")
    expect(state["logout_shown"], "no visible button#logout")
    summary = check_sections(state, queries)
    approved = [q["id"] for q in queries if q["state"] == "approved"]
    expect(approved, "no query is approved")
    steps.ok(f"signed in as {LEGAL}: #viewer {' '.join(state['viewer'].split())!r}; "
             f"every section has its state, badge and title ({summary}); approved: {', '.join(approved)}")

    width, height = screenshot(driver, args.screenshot)
    steps.ok(f"screenshot {args.screenshot} ({width}x{height})")

    # 2. Edit the query file; the page must show the change.
    new_k = None
    if use_grpc:
        path = find_query_file(Path(args.queries_dir), qid)
        old_k, new_k, skipped = edit_k(base, path, qid, [] if args.keep_edit else restore, args.timeout)
        steps.ok(f"edited {path}: k = {old_k} -> k = {new_k}"
                 + (f" (skipped, already decided by an earlier run: {skipped})" if skipped else ""))

    def changed():
        driver.refresh()
        try:
            s = wait_rendered(driver, [qid], timeout=5)
        except StepFailed:
            return None
        sec = section(s, qid)
        return s if sec["state"] == "changed" and ".diff" in sec["has"] else None

    started = time.monotonic()
    state = wait_for(f'{qid} to show data-state="changed" with a .diff', changed, timeout=args.timeout, interval=1.0)
    q = query_json(base, qid)
    expect(q["state"] == "changed" and q.get("diff"), f"/api/allowlist says {qid} is {q['state']!r}, diff {q.get('diff')!r}")
    check_sections(state, allowlist(base)["queries"])
    sec = section(state, qid)
    steps.ok(f'the page shows {qid} as data-state="changed" with a .diff ({sec["diff_ins"]} inserted, '
             f'{sec["diff_del"]} deleted lines) after {time.monotonic() - started:.1f} s')

    # 3. The changed query cannot run.
    if use_grpc:
        import grpc  # noqa: PLC0415

        try:
            sakura.run_with(qid, params)
            fail(f"{qid} ran as {SAKURA} although its content changed since approval")
        except cc.CleanroomError as error:
            expect(error.code == grpc.StatusCode.FAILED_PRECONDITION, f"expected FAILED_PRECONDITION, got {error}")
            steps.ok(f"gRPC: running the changed {qid} as {SAKURA} is refused: {error}")

    # 4. A partner's token gets an error and cannot approve.
    driver.find_element(By.CSS_SELECTOR, "button#logout").click()
    state = wait_for("the token form after sign-out", lambda: (lambda s: s if s["form_shown"] else None)(page_state(driver)))
    expect(not any(s["shown"] for s in state["sections"]), "queries still shown after sign-out")
    expect(not state["token_stored"], f"sign-out left the token in sessionStorage: {state['token_stored']!r}")
    steps.ok("signed out: the token form is back, no query shown, token removed from sessionStorage")

    login(driver, SAKURA)
    state = wait_for("#message[data-kind=error] for a partner token",
                     lambda: (lambda s: s if s["message_kind"] == "error" else None)(page_state(driver)))
    time.sleep(0.5)  # let anything else the page would do land
    state = page_state(driver)
    expect(state["message_kind"] == "error", f"#message changed to {state['message_kind']!r}: {state['message']!r}")
    expect(not any(s["shown"] for s in state["sections"]), "a partner's token shows queries")
    expect(state["approve_shown"] == 0, "a partner's token shows approve buttons")
    sha = query_json(base, qid)["content_sha256"]
    answer = driver.execute_async_script(POST_JS, urljoin(base, f"api/queries/{qid}/approve"), SAKURA,
                                         {"content_sha256": sha, "expires": None, "note": "partner tries"})
    expect(answer["status"] in (401, 403), f"an approval posted with {SAKURA} answered {answer['status']}: {answer['body']}")
    q = query_json(base, qid)
    expect(q["state"] == "changed", f"after the partner's attempt {qid} is {q['state']!r}")
    steps.ok(f"signed in as {SAKURA}: #message[data-kind=error] {state['message']!r}; no query or approve button "
             f"shown; a direct approval answers {answer['status']}; {qid} is still changed")

    # 5. The legal reviewer approves through the page.
    login(driver, LEGAL)
    state = wait_rendered(driver, ids)
    expect(section(state, qid)["state"] == "changed", f"{qid} is {section(state, qid)['state']!r} after signing back in")
    click_approve(driver, qid, "approved by review_page_test.py")

    def approved_now():
        s = page_state(driver)
        sec = section(s, qid)
        return s if sec and sec["state"] == "approved" and s["message_kind"] == "ok" else None

    state = wait_for(f'{qid} to show data-state="approved" and #message[data-kind=ok]', approved_now, timeout=args.timeout)
    sec = section(state, qid)
    expect(".diff" not in sec["has"], f"{qid} still shows a .diff after approval")
    expect(query_json(base, qid)["state"] == "approved", f"/api/allowlist does not say {qid} is approved")
    steps.ok(f'approved {qid} through the page: data-state="approved", #message {state["message"]!r}')

    if use_grpc:
        answer = sakura.run_with(qid, params)
        expect(answer.effective_k >= new_k, f"the approved version runs with k={answer.effective_k}, expected >= {new_k}")
        steps.ok(f"gRPC: {qid} runs again as {SAKURA} (v{answer.query_version}, {answer.released_rows} rows, "
                 f"k={answer.effective_k}, {answer.audit_id})")

    after = suffixed(args.screenshot, "-after-approve")
    width, height = screenshot(driver, after)
    steps.ok(f"screenshot {after} ({width}x{height})")

    def approve_row():
        rows = page_state(driver)["audit"]
        return next((r for r in rows if r["shown"] and "ApproveQuery" in r["cells"]
                     and any(qid in c for c in r["cells"])), None)

    row = wait_for(f"a row of table#audit with method ApproveQuery for {qid}", approve_row, timeout=10)
    steps.ok(f"table#audit has {row['id']}: {' | '.join(' '.join(c.split()) for c in row['cells'] if c)}")

    errors = console_errors(driver)
    expect(not errors, f"JavaScript errors in the console: {errors}")
    steps.ok("no JavaScript error in the console")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the review page, e.g. http://127.0.0.1:PORT/")
    parser.add_argument("--queries-dir", help="the allow-list directory the service reads (edited, then restored)")
    parser.add_argument("--grpc", help="HOST:PORT of the gRPC service")
    parser.add_argument("--ca", help="CA certificate (PEM) of the gRPC service's TLS")
    parser.add_argument("--spki", help="base64 SHA-256 of the page's TLS public key, for an https:// --url")
    parser.add_argument("--screenshot", required=True, help="PNG path; the second one gets -after-approve")
    parser.add_argument("--query", default="category_buyers_by_age_band", help="the query to edit and approve")
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC checks and the file edit (mock server)")
    parser.add_argument("--keep-edit", action="store_true", help="leave the edited query file as it is")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the page to change")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args(argv)
    global TLS_CONTEXT
    if args.ca:
        TLS_CONTEXT = ssl.create_default_context(cafile=args.ca)
    if not args.no_grpc and not (args.queries_dir and args.grpc):
        parser.error("--queries-dir and --grpc are required unless --no-grpc")

    steps = Steps()
    restore: list = []
    driver = profile = None
    failure = None
    try:
        driver, profile = start_browser(args.chromium, args.chromedriver, args.spki)
        steps.ok(f"Chromium {driver.capabilities.get('browserVersion')} headless through "
                 f"{args.chromedriver} {driver.capabilities.get('chrome', {}).get('chromedriverVersion', '').split(' ')[0]}")
        run(args, steps, driver, restore)
    except StepFailed as error:
        failure = str(error)
    except Exception as error:  # noqa: BLE001 - any other error is a failure of the next step too
        code = getattr(error, "code", None)
        if callable(code) and hasattr(error, "details"):  # a gRPC error
            failure = f"gRPC call failed: {code().name}: {error.details()}"
        else:
            failure = f"{type(error).__name__}: {getattr(error, 'msg', None) or error}"
    finally:
        for path, text in restore:
            path.write_text(text, encoding="utf-8")
            print(f"restored {path}")
        if failure and driver is not None:
            try:
                shot = suffixed(args.screenshot, "-failure")
                screenshot(driver, shot)
                print(f"failure screenshot: {shot}")
            except Exception:  # noqa: BLE001
                pass
        if driver is not None:
            driver.quit()
        if profile:
            shutil.rmtree(profile, ignore_errors=True)
    if failure:
        print(f"FAIL step {steps.passed + 1}: {failure}", flush=True)
        print(f"review_page: {steps.passed} passed, 1 failed")
        return 1
    print(f"review_page: {steps.passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
