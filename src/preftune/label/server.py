"""The labelling web UI: a small local HTTP server (standard library only) over a LabelSession.

    GET  /            the page
    GET  /api/next    the next item {key, mode, prompt, completions: [{id, text}], done, total} or {finished}
    POST /api/label   {"key", "ranking": [[id...], ...]} | {"key", "labels": [bool...]} | {"key", "skip": true}
    POST /api/undo    take back the last label of this session

Every label is on disk (fsynced) before the page shows the next item. The server binds to a loopback
address only (it has no login; ``preftune collect`` is the team version with accounts), answers only
Host headers naming that address, and refuses cross-origin and non-JSON POSTs.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from preftune.label.session import LabelError, LabelSession

log = logging.getLogger("preftune.label")

_MAX_BODY = 1 << 20
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def make_server(session: LabelSession, host: str = "127.0.0.1", port: int = 8765, *, title: str = "preftune: label",
                exit_when_done: bool = False) -> ThreadingHTTPServer:
    """A server (not yet serving: call ``serve_forever``); port 0 picks a free one (``server.server_port``)."""
    page = PAGE.replace("__TITLE__", _html_escape(title)).encode("utf-8")
    lock = threading.Lock()  # one label at a time: checks and appends are atomic together

    class Handler(BaseHTTPRequestHandler):
        timeout = 20  # seconds a request may stall (a slow or abandoned body) before its thread is freed

        def log_message(self, fmt, *args):  # requests are routine; keep the terminal for progress
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict) -> None:
            self._send(status, json.dumps(data, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

        def _next(self) -> dict:
            item = session.next_item()
            return item if item is not None else {"finished": True, "can_undo": bool(session.history), **session.progress()}

        def _refused(self) -> bool:
            """Requests this one-person page never honours: a foreign Host (DNS rebinding) and, for
            POSTs, a foreign Origin or a non-JSON body type (what a blind cross-site form or
            text/plain fetch sends; application/json from another site needs a CORS preflight, never granted)."""
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if host not in _LOOPBACK and host != server.server_address[0]:
                self._json(400, {"error": f"unexpected Host {host[:100]!r}"})
                return True
            if self.command != "POST":
                return False
            origin = self.headers.get("Origin")
            if origin is not None and origin.split("://", 1)[-1] != self.headers.get("Host"):
                self._json(403, {"error": "cross-origin request refused"})
                return True
            if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
                self._json(415, {"error": "expected Content-Type: application/json"})
                return True
            return False

        def do_GET(self):
            if self._refused():
                return
            if self.path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
            elif self.path == "/api/next":
                self._json(200, self._next())
            else:
                self._json(404, {"error": f"no such page {self.path}"})

        def do_POST(self):
            if self._refused():
                return
            raw_length = (self.headers.get("Content-Length") or "0").strip()
            if not raw_length.isdigit():  # "-1" used to mean "read everything"
                self.close_connection = True
                return self._json(400, {"error": "Content-Length must be a non-negative integer"})
            length = int(raw_length)
            if length > _MAX_BODY:
                self.close_connection = True
                return self._json(413, {"error": "request too large"})
            try:
                body = json.loads((self.rfile.read(length) or b"{}").decode("utf-8"))
                if not isinstance(body, dict):
                    raise LabelError("expected a JSON object")
                with lock:
                    if self.path == "/api/label":
                        if body.get("skip") is True:
                            session.skip(body.get("key"))
                        elif "ranking" in body:
                            session.rank(body.get("key"), body["ranking"])
                        elif "labels" in body:
                            session.thumbs(body.get("key"), body["labels"])
                        else:
                            raise LabelError("expected 'ranking', 'labels' or 'skip'")
                        p = session.progress()
                        log.info("labelled %d / %d", p["done"], p["total"])
                    elif self.path == "/api/undo":
                        if session.undo() is None:
                            raise LabelError("nothing to undo in this session")
                    else:
                        return self._json(404, {"error": f"no such endpoint {self.path}"})
                    reply = self._next()
            except UnicodeDecodeError:
                return self._json(400, {"error": "request is not UTF-8"})
            except json.JSONDecodeError as err:
                return self._json(400, {"error": f"request is not JSON: {err}"})
            except LabelError as err:
                return self._json(400, {"error": str(err)})
            self._json(200, reply)
            if exit_when_done and reply.get("finished"):
                threading.Thread(target=server.shutdown, daemon=True).start()

    class Server(ThreadingHTTPServer):
        request_queue_size = 1024  # the default listen backlog of 5 reset most of 1,000 simultaneous connections
        daemon_threads = True

    server = Server((host, port), Handler)
    return server


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
 header{display:flex;justify-content:space-between;align-items:baseline}
 .bar{height:6px;background:#eee;border-radius:3px;margin:.4em 0 1em}.bar>div{height:6px;background:#4a7;border-radius:3px}
 .prompt,.text{white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word;border-radius:6px;padding:.8em;line-height:1.45;overflow:auto}
 .text{max-height:45vh}.card{min-width:0} .actions{position:sticky;bottom:0;background:#fff;padding:.5em 0;border-top:1px solid #ccc}
 .prompt{background:#f3f3f7;border:1px solid #dde}
 .cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:1em;margin:1em 0}
 .card{border:2px solid #ddd;border-radius:8px;padding:.6em}.card.picked{border-color:#4a7}
 .card h3{margin:.2em 0;font-size:1em}.text{background:#fafafa}
 .choices button{margin:.15em;min-width:2.4em}.choices button.on{background:#4a7;color:#fff;border-color:#4a7}
 .actions button{font-size:1em;margin-right:.5em;padding:.4em 1em}
 #error{color:#b00;min-height:1.3em}.help{color:#666;font-size:.9em}
</style></head><body>
<header><h2>__TITLE__</h2><span id="count"></span></header>
<div class="bar"><div id="progress" style="width:0"></div></div>
<div id="main"></div>
<p id="error"></p>
<p class="actions"><button id="submit">Submit (Enter)</button><button id="skip">Skip (s)</button><button id="undo">Undo (u)</button></p>
<p class="help" id="help"></p>
<script>
let item = null, choice = {};
const $ = id => document.getElementById(id);
function el(tag, cls, text){const e=document.createElement(tag); if(cls) e.className=cls; if(text!==undefined) e.textContent=text; return e;}
let busy = false;
async function call(url, body){
  if(busy) return;  // one request at a time: a second key press must not act on the next item
  busy = true;
  try{
    const r = await fetch(url, body===undefined ? {} : {method:"POST", headers:{"Content-Type":"application/json"}, body:JSON.stringify(body)});
    const data = await r.json();
    if(!r.ok){ $("error").textContent = data.error || ("error " + r.status); return; }
    $("error").textContent = ""; show(data);
  } finally { busy = false; }
}
function show(data){
  item = data.finished ? null : data; choice = {};
  $("count").textContent = data.done + " / " + data.total + " labelled";
  $("progress").style.width = (data.total ? 100*data.done/data.total : 100) + "%";
  $("undo").disabled = !data.can_undo;
  const main = $("main"); main.replaceChildren();
  if(!item){ main.appendChild(el("h3", "", "All items are labelled. The labels are saved; Undo (u) still works. Stop the server with Ctrl-C.")); $("submit").disabled=$("skip").disabled=true; return; }
  $("submit").disabled=$("skip").disabled=false;
  main.appendChild(el("h4", "", "Prompt")); main.appendChild(el("div", "prompt", item.prompt));
  const cards = el("div", "cards"); main.appendChild(cards);
  const k = item.completions.length;
  item.completions.forEach((c, pos) => {
    const card = el("div", "card"); card.id = "card" + pos;
    card.appendChild(el("h3", "", String.fromCharCode(65 + pos)));
    card.appendChild(el("div", "text", c.text));
    const row = el("div", "choices");
    const options = item.mode === "rank" ? [...Array(k).keys()].map(r => [r + 1, "#" + (r + 1)]) : [[true, "\\u{1F44D} Good"], [false, "\\u{1F44E} Bad"]];
    options.forEach(([value, label]) => {
      const b = el("button", "", label);
      b.onclick = e => { e.currentTarget.blur(); choice[pos] = value; paint(); };
      b.dataset.pos = pos; b.dataset.value = String(value); row.appendChild(b);
    });
    card.appendChild(row); cards.appendChild(card);
  });
  $("help").textContent = item.mode === "rank"
    ? "Give every completion a rank (#1 = best); equal ranks are ties." + (k === 2 ? " Keys: 1 = A better, 2 = B better." : "")
    : "Thumbs up or down for every completion.";
  paint();
}
function paint(){
  document.querySelectorAll(".choices button").forEach(b => b.classList.toggle("on", String(choice[b.dataset.pos]) === b.dataset.value));
  if(item) item.completions.forEach((c, pos) => $("card" + pos).classList.toggle("picked", pos in choice));
}
function byId(){  // thumbs in the items' own order (the page shows them shuffled)
  const labels = []; item.completions.forEach((c, pos) => labels[c.id] = choice[pos]); return labels;
}
function submit(){
  if(!item) return;
  const k = item.completions.length;
  if(Object.keys(choice).length < k){ $("error").textContent = "Label every completion first."; return; }
  if(item.mode === "thumbs") return call("/api/label", {key:item.key, labels:byId()});
  const groups = {};
  item.completions.forEach((c, pos) => (groups[choice[pos]] = groups[choice[pos]] || []).push(c.id));
  call("/api/label", {key:item.key, ranking:Object.keys(groups).map(Number).sort((a, b) => a - b).map(r => groups[r])});
}
$("submit").onclick = submit;
$("skip").onclick = e => { e.currentTarget.blur(); if(item) call("/api/label", {key:item.key, skip:true}); };
$("undo").onclick = e => { e.currentTarget.blur(); call("/api/undo", {}); };
$("submit").addEventListener("click", e => e.currentTarget.blur());
document.addEventListener("keydown", e => {
  if(e.ctrlKey || e.metaKey || e.altKey) return;  // Ctrl+S saves the page; it is no shortcut here
  if(["Enter", "s", "u", "1", "2"].includes(e.key)) e.preventDefault();  // Enter must not also press a focused button
  if(!item) { if(e.key === "u") call("/api/undo", {}); return; }
  if(e.key === "Enter") submit();
  else if(e.key === "s") $("skip").click();
  else if(e.key === "u") $("undo").click();
  else if(item.mode === "rank" && item.completions.length === 2 && (e.key === "1" || e.key === "2")){
    const best = Number(e.key) - 1; choice = {[best]: 1, [1 - best]: 2}; paint(); submit();
  }
});
call("/api/next");
</script></body></html>
"""
