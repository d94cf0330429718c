#!/usr/bin/env python3
"""The audit page in a real browser: Debian's headless Chromium, driven over the DevTools protocol (on a pipe:
--remote-debugging-pipe, so the standard library suffices), against rapidin-server --http-listen on loopback with a
small project-made store and bearer tokens. It types into the form and submits it, checks the rows and the shaded
tokens in the DOM, the words of an error, a record viewer lookup, the stats panel, that the token field is kept in
the session only, and that 10,000 returned records render without freezing the tab; then saves a screenshot of a
real answer.

Usage: browser_test.py RAPIDIN_SERVER RAPIDIN_CLI [SCREENSHOT.png]
Exit 77 (skip) when Chromium is not installed.
"""
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from e2e_util import free_port, wait_healthy

SERVER, CLI = sys.argv[1], sys.argv[2]
SHOT = sys.argv[3] if len(sys.argv) > 3 else None
HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "fixtures", "qwen2_chat")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    print("browser_test: skipped, Chromium is not installed (apt-get install chromium)")
    sys.exit(77)
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)


class Browser:
    """A headless Chromium and one page, over the DevTools protocol's pipe transport (NUL-separated JSON)."""

    def __init__(self, profile):
        cmd_r, self.cmd_w = os.pipe()
        self.resp_r, resp_w = os.pipe()

        def fds():  # Chromium reads commands on fd 3 and writes answers and events on fd 4
            a, b = os.dup(cmd_r), os.dup(resp_w)  # away from 3 and 4 first: either may be one of them
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--window-size=1280,900", f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=open(f"{profile}.log", "w"))
        os.close(cmd_r)
        os.close(resp_w)
        self.buf = b""
        self.next_id = 0
        self.events = []
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Runtime.enable", session=True)

    def send(self, method, session=False, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self.read()
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def read(self):
        while b"\0" not in self.buf:
            chunk = os.read(self.resp_r, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def js(self, expr):
        r = self.send("Runtime.evaluate", session=True, expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def navigate(self, url):
        self.send("Page.navigate", session=True, url=url)
        self.wait("document.readyState === 'complete' && !!document.getElementById('qform')")

    def wait(self, cond, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            if self.js(f"!!({cond})"):
                return True
            time.sleep(0.05)
        return False

    def close(self):
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main():
    work = tempfile.mkdtemp()
    recs = [
        {"id": "health-1", "instruction": "Give three tips for staying healthy.",
         "output": "Eat a balanced diet, exercise regularly and sleep well."},
        {"id": "router-1", "instruction": "What does the router do?",
         "output": "It fans each query out to the shard servers and merges their answers."},
        {"id": "store-1", "instruction": "Where are the vectors kept?",
         "output": "In GPU memory, host memory and a RocksDB cold tier."},
        {"id": "chat-1", "messages": [{"role": "user", "content": "Say hello."},
                                      {"role": "assistant", "content": "Hello there!"}]},
        {"id": "text-1", "text": "The merge stage returns the global top-k with token-level attributions."},
    ]
    with open(f"{work}/recs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    subprocess.run([CLI, "cache", "--model", MODEL, "--data", f"{work}/recs.jsonl", "--store", f"{work}/store",
                    "--k", "256"], check=True, capture_output=True)
    with open(f"{work}/tokens", "w") as f:
        f.write("page-token query\n")
    port = free_port()
    server = subprocess.Popen([SERVER, "--store", f"{work}/store", "--model", MODEL, "--listen", "127.0.0.1:0",
                               "--http-listen", f"127.0.0.1:{port}", "--metrics-listen", "",
                               "--auth-tokens", f"{work}/tokens"],
                              stdout=open(f"{work}/server.log", "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, server)
    browser = Browser(f"{work}/profile")
    try:
        browser.navigate(base + "/")
        # Without a token the page says so in words (stats panel), not a blank page.
        check(browser.wait("document.querySelector('#stats .error')"), "no error shown for a missing token")
        check("UNAUTHENTICATED" in browser.js("document.getElementById('stats').textContent"), "stats error words")
        # The token field: kept in sessionStorage only, sent as a bearer token.
        browser.js("""(() => { const t = document.getElementById('token'); t.value = 'page-token';
                      t.dispatchEvent(new Event('change')); document.getElementById('refresh').click(); })()""")
        check(browser.wait("document.querySelector('#stats table')"), "stats with the token")
        stats = browser.js("document.getElementById('stats').textContent")
        check("records5" in stats.replace(" ", "") and "loaded" in stats, f"stats panel: {stats}")
        check(browser.js("sessionStorage.getItem('rapidin-token')") == "page-token", "token in sessionStorage")
        check(browser.js("localStorage.length") == 0, "nothing in localStorage")
        # Type a query and submit the form.
        browser.js("""(() => {
            const set = (id, v) => { const e = document.getElementById(id); e.value = v;
                                     e.dispatchEvent(new Event('input')); };
            set('instruction', 'Give three tips for staying healthy.');
            set('generation', 'Eat a balanced diet, exercise regularly and sleep well.');
            set('topk', '3'); set('harmfulk', '2');
            document.getElementById('submit').click(); })()""")
        check(browser.wait("document.querySelectorAll('#helpful tr.r').length > 0"), "no helpful rows")
        rows = browser.js("[...document.querySelectorAll('#helpful tr.r')].map(r => r.cells[2].textContent)")
        check(rows and rows[0] == "health-1" and len(rows) == 3, f"helpful rows {rows}")
        check(browser.js("document.querySelectorAll('#harmful tr.r').length") == 2, "harmful rows")
        # Open the first row: the generation's and the record's tokens, shaded, the score on hover.
        browser.js("document.querySelector('#helpful tr.r').click()")
        check(browser.wait("document.querySelectorAll('#helpful tr.d span.t').length > 10"), "no token views")
        shaded = browser.js("""[...document.querySelectorAll('#helpful tr.d span.t')].filter(s =>
            /rgba\\(.*,\\s*0?\\.[0-9]*[1-9]/.test(s.style.background) && s.title.length > 0).length""")
        check(shaded > 5, f"shaded tokens with a hover value: {shaded}")
        gen = browser.js("document.querySelector('#helpful tr.d .view').textContent")
        check("balanced diet" in gen, f"generation view: {gen}")
        if SHOT:
            png = base64.b64decode(browser.send("Page.captureScreenshot", session=True, format="png")["data"])
            with open(SHOT, "wb") as f:
                f.write(png)
            print(f"browser_test: wrote {SHOT} ({len(png)} bytes)")
        # The record viewer.
        browser.js("(() => { document.getElementById('rid').value = 'chat-1'; "
                   "document.querySelector('#rform button').click(); })()")
        check(browser.wait("document.getElementById('record').textContent.includes('Hello there!')"), "record viewer")
        # A bad request: an empty generation, shown as words.
        browser.js("""(() => { document.getElementById('generation').value = '';
                      document.getElementById('submit').click(); })()""")
        check(browser.wait("document.getElementById('status').className === 'error'"), "no error for a bad request")
        err = browser.js("document.getElementById('status').textContent")
        check("INVALID_ARGUMENT" in err and "generation is empty" in err, f"error words: {err}")
        # A chat query from the chat field: the training chat comes first, its tokens name the message.
        browser.js("""(() => { document.getElementById('chat').value = JSON.stringify([
                        {role: 'user', content: 'Say hello.'}, {role: 'assistant', content: 'Hello there!'}]);
                      document.getElementById('submit').click(); })()""")
        check(browser.wait("document.getElementById('status').className === 'ok' && "
                           "document.querySelector('#helpful tr.r') && "
                           "document.querySelector('#helpful tr.r').cells[2].textContent === 'chat-1'"),
              "chat query: chat-1 not first")
        browser.js("document.querySelector('#helpful tr.r').click()")
        check(browser.wait("[...document.querySelectorAll('#helpful tr.d span.t')].some(s => s.title.startsWith('messages[1]'))"),
              "chat query: no token placed in messages[1]")
        browser.js("""(() => { document.getElementById('chat').value = '[not json';
                      document.getElementById('submit').click(); })()""")
        check(browser.wait("document.getElementById('status').textContent.includes('not JSON')"), "bad chat JSON")
        browser.js("document.getElementById('chat').value = ''")
        # 10,000 records returned: drawn in one pass, rows open on demand; the tab stays responsive.
        ms = browser.js("""(() => {
            const tok = (i) => ({text: 'tok' + i, field: 'generation', score: Math.sin(i)});
            const rec = (i) => ({rank: i + 1, id: 'r' + i, score: 10000 - i, index: String(i),
                                 record: {id: 'r' + i, instruction: 'instruction ' + i, output: 'output ' + i},
                                 generationTokens: [tok(1), tok(2), tok(3)], recordTokens: [tok(4)],
                                 recordInfluenceTokens: [tok(5)]});
            const helpful = []; for (let i = 0; i < 10000; ++i) helpful.push(rec(i));
            const t0 = performance.now();
            window.render({result: {helpful, harmful: []}, totalMs: 1});
            return performance.now() - t0; })()""")
        n = browser.js("document.querySelectorAll('#helpful tr.r').length")
        check(n == 10000, f"10,000 rows drawn: {n}")
        check(ms < 3000, f"10,000 rows took {ms:.0f} ms")
        t0 = time.time()
        browser.js("document.querySelectorAll('#helpful tr.r')[9999].click()")
        check(browser.js("document.querySelectorAll('#helpful tr.d span.t').length") == 5, "row 10,000 opens")
        check(time.time() - t0 < 2, "opening a row among 10,000 is quick")
        print(f"browser_test: 10,000 rows rendered in {ms:.0f} ms")
    finally:
        browser.close()
        server.terminate()
        server.wait(timeout=20)
    if failures:
        print(f"browser_test: {len(failures)} failure(s)")
        sys.exit(1)
    print("browser_test: all checks passed")


if __name__ == "__main__":
    main()
