"""The web app's pages. All item text reaches the page as JSON and is put in with ``textContent``
(never ``innerHTML``), so a completion holding ``<script>`` is shown as those characters; invisible
and direction-changing characters are replaced by visible marks; guidelines are Markdown rendered
with raw HTML disabled."""

from __future__ import annotations

import html

from markdown_it import MarkdownIt

STYLE = """
 *{box-sizing:border-box} body{font-family:system-ui,sans-serif;max-width:1200px;margin:0 auto;padding:0 1em;color:#222}
 header{display:flex;justify-content:space-between;align-items:baseline;gap:1em;flex-wrap:wrap}
 header nav a{margin-left:1em} .muted{color:#666;font-size:.9em}
 .prompt,.text{white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word;border-radius:6px;padding:.7em;line-height:1.45;overflow:auto}
 .prompt{background:#f3f3f7;border:1px solid #dde;max-height:25vh}
 .cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:1em;margin:1em 0}
 .card{border:2px solid #ddd;border-radius:8px;padding:.6em;min-width:0;display:flex;flex-direction:column}
 .card.picked{border-color:#4a7}.card.cursor{box-shadow:0 0 0 3px #9bd}
 .card h3{margin:.2em 0;font-size:1em}.text{background:#fafafa;max-height:45vh;flex:1}
 .mark{background:#fdd;color:#900;border:1px solid #c99;border-radius:3px;font-size:.8em;padding:0 .2em}
 .warn{color:#900;font-size:.85em}
 .choices button{margin:.15em;min-width:2.6em}.choices button.on{background:#4a7;color:#fff;border-color:#4a7}
 .controls{position:sticky;bottom:0;background:#fff;border-top:1px solid #ccc;padding:.6em 0;display:flex;flex-wrap:wrap;gap:.4em;align-items:center}
 .controls button{font-size:1em;padding:.4em .9em} #comment{flex:1;min-width:12em;padding:.4em}
 #error{color:#b00;min-height:1.3em;margin:.3em 0} table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left}
 .history li{margin:.2em 0}
"""


def page(title: str, body: str, *, csrf: str = "") -> str:
    meta = f'<meta name="csrf" content="{html.escape(csrf)}">' if csrf else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">{meta}<style>{STYLE}</style></head>'
            f"<body>{body}</body></html>")


def message(title: str, text: str, link: tuple[str, str] | None = None) -> str:
    a = f'<p><a id="go" href="{html.escape(link[0])}">{html.escape(link[1])}</a></p>' if link else ""
    return page(title, f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>{a}")


def logged_in(where: str, name: str) -> str:
    """After login: a same-site link onward (a SameSite=Strict cookie is not sent on a redirect
    that started at another site, e.g. a link in a mail, but is sent when this page moves on)."""
    return page("Logged in", f'<meta http-equiv="refresh" content="0;url={html.escape(where)}">'
                f"<p>Logged in as {html.escape(name)}. <a id=\"go\" href=\"{html.escape(where)}\">Continue</a></p>")


def guidelines(text: str, name: str) -> str:
    rendered = MarkdownIt("commonmark", {"html": False}).render(text) if text.strip() else "<p>(No guidelines for this project.)</p>"
    return page("Guidelines", f'<header><h2>Guidelines</h2><span class="muted">{html.escape(name)}</span></header>'
                f'<article id="guidelines">{rendered}</article><p><a id="start" href="/">Start labelling &rarr;</a></p>')


def admin(status: dict) -> str:
    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    a = status["agreement"]
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{c['answered']}</td><td>{c['skipped']}</td>"
                   f"<td>{num(a['annotator_vs_others'].get(n))}</td><td>{num(status['gold_accuracy'].get(n))}</td></tr>"
                   for n, c in status["annotators"].items())
    worst = "".join(f"<tr><td><code>{html.escape(d['item'])}</code></td><td>{num(d['agreement'])}</td><td>{html.escape(d['prompt'])}</td></tr>"
                    for d in status["most_disagreed"])
    body = (f"<h2>Project</h2><p>{status['items']} items ({html.escape(str(status['mode']))}, overlap {status['overlap']}): "
            f"<b id=\"complete\">{status['items_complete']}</b> complete, {status['answers']} answers.</p>"
            f"<p>Agreement: pairwise {num(a['pairwise_agreement'])}, Fleiss' &kappa; {num(a['fleiss_kappa'])}, "
            f"Krippendorff's &alpha; (ordinal) {num(a['krippendorff_alpha_ordinal'])}</p>"
            "<h3>Annotators</h3><table><tr><th>annotator</th><th>answered</th><th>skipped</th><th>agreement with the others</th>"
            f"<th>gold accuracy</th></tr>{rows}</table>"
            f"<h3>Most disagreement</h3><table><tr><th>item</th><th>agreement</th><th>prompt</th></tr>{worst}</table>")
    return page("preftune collect: admin", body)


LABEL_BODY = """
<header><h2>__TITLE__</h2><span id="count" class="muted"></span>
<nav><a href="/guidelines">Guidelines</a><a href="#history" id="show-history">My labels</a></nav></header>
<main id="main"></main>
<div class="controls" id="controls">
 <span id="pair" hidden><button id="a-better">A better (1)</button><button id="b-better">B better (2)</button>
 <button id="tie">Tie (t)</button></span><button id="both-bad">Both bad (b)</button>
 <input id="comment" placeholder="Optional comment" maxlength="2000" aria-label="comment">
 <button id="submit">Submit (Enter)</button><button id="skip">Skip (s)</button><button id="undo">Undo (u)</button>
 <div id="error" role="alert"></div>
</div>
<p class="muted" id="help"></p>
<section id="history" hidden><h3>My labels</h3><ol class="history" id="history-list"></ol></section>
<script>
"use strict";
const CSRF = document.querySelector('meta[name="csrf"]').content;
const $ = id => document.getElementById(id);
let item = null, choice = {}, cursor = 0, busy = false;
const INVISIBLE = /([\\u00AD\\u061C\\u115F\\u1160\\u180E\\u200B-\\u200F\\u202A-\\u202E\\u2060-\\u2069\\u3164\\uFEFF])/;
function el(tag, cls, text){ const e = document.createElement(tag); if(cls) e.className = cls; if(text !== undefined) e.textContent = text; return e; }
function textBox(cls, text){  // text as text; invisible / bidi characters become visible marks
  const box = el("div", cls); let marked = 0;
  for(const part of text.split(INVISIBLE)){
    if(!part) continue;
    if(INVISIBLE.test(part) && part.length === 1){
      const m = el("span", "mark", "U+" + part.codePointAt(0).toString(16).toUpperCase().padStart(4, "0"));
      m.title = "invisible or direction-changing character"; box.appendChild(m); marked++;
    } else box.appendChild(document.createTextNode(part));
  }
  const visible = text.split(INVISIBLE).filter(p => !(INVISIBLE.test(p) && p.length === 1)).join("").trim();
  return [box, marked, visible.length === 0];
}
async function call(url, body){
  if(busy) return null;
  busy = true;
  try{
    const opts = body === undefined ? {} : {method:"POST", headers:{"Content-Type":"application/json", "X-CSRF-Token":CSRF}, body:JSON.stringify(body)};
    const r = await fetch(url, opts);
    const data = await r.json().catch(() => ({error:"error " + r.status}));
    if(!r.ok){ $("error").textContent = data.error || ("error " + r.status); return null; }
    $("error").textContent = ""; return data;
  } finally { busy = false; }
}
async function next(){ const data = await call("/api/next"); if(data) show(data); loadHistory(); }
async function post(url, body){ const data = await call(url, body); if(data) await next(); }
function show(data){
  item = data.item ? data : null; choice = {}; cursor = 0; $("comment").value = "";
  $("count").textContent = data.progress.answered + " answered by you · " + data.progress.complete + " of " + data.progress.items + " items complete";
  const main = $("main"); main.replaceChildren();
  ["submit", "skip", "both-bad", "tie", "a-better", "b-better"].forEach(id => $(id).disabled = !item);
  if(!item){ main.appendChild(el("h3", "", "Nothing left for you to label. Thank you! Every answer is saved; Undo still works.")); $("pair").hidden = true; return; }
  main.appendChild(el("h4", "", "Prompt")); main.appendChild(textBox("prompt", item.prompt)[0]);
  const cards = el("div", "cards"); main.appendChild(cards);
  const k = item.completions.length;
  item.completions.forEach((c, pos) => {
    const card = el("div", "card"); card.id = "card" + pos;
    card.appendChild(el("h3", "", String.fromCharCode(65 + pos)));
    const [box, marked, empty] = textBox("text", c.text);
    if(marked) card.appendChild(el("div", "warn", "Contains " + marked + " invisible or direction-changing character(s), shown as U+ marks."));
    if(empty) card.appendChild(el("div", "warn", "This completion has no visible characters."));
    card.appendChild(box);
    const row = el("div", "choices");
    const options = item.mode === "rank" ? [...Array(k).keys()].map(r => [r + 1, "#" + (r + 1)]) : [[true, "\\u{1F44D} Good"], [false, "\\u{1F44E} Bad"]];
    options.forEach(([value, label]) => {
      const b = el("button", "", label); b.dataset.pos = pos; b.dataset.value = String(value);
      b.onclick = e => { e.currentTarget.blur(); choice[pos] = value; cursor = Math.min(pos + 1, k - 1); paint(); };
      row.appendChild(b);
    });
    card.appendChild(row); cards.appendChild(card);
  });
  $("pair").hidden = !(item.mode === "rank" && k === 2);
  $("help").textContent = item.mode === "rank"
    ? (k === 2 ? "Keys: 1 = A better, 2 = B better, t = tie, b = both bad, s = skip, u = undo." : "Keys: type the rank (1 = best) of each completion in turn (A, B, ...), then Enter; equal ranks are ties. s = skip, u = undo.")
    : "Keys: g = good, x = bad for each completion in turn (A, B, ...), then Enter. s = skip, u = undo.";
  paint();
}
function paint(){
  document.querySelectorAll(".choices button").forEach(b => b.classList.toggle("on", String(choice[b.dataset.pos]) === b.dataset.value));
  if(item) item.completions.forEach((c, pos) => { $("card" + pos).classList.toggle("picked", pos in choice); $("card" + pos).classList.toggle("cursor", pos === cursor); });
}
function base(){ return {item:item.key, comment:$("comment").value || null, submission:item.submission}; }
function byId(){  // thumbs in the items' own order (the page shows them shuffled)
  const labels = []; item.completions.forEach((c, pos) => labels[c.id] = choice[pos]); return labels;
}
function submit(){
  if(!item) return;
  const k = item.completions.length;
  if(Object.keys(choice).length < k){ $("error").textContent = "Label every completion first."; return; }
  if(item.mode === "thumbs") return post("/api/label", {...base(), labels:byId()});
  const groups = {};
  item.completions.forEach((c, pos) => (groups[choice[pos]] = groups[choice[pos]] || []).push(c.id));
  post("/api/label", {...base(), ranking:Object.keys(groups).map(Number).sort((a, b) => a - b).map(r => groups[r])});
}
function pair(first){  // two completions: ids in display order
  const ids = item.completions.map(c => c.id);
  return post("/api/label", {...base(), ranking: first === null ? [ids] : [[ids[first]], [ids[1 - first]]]});
}
function click(id){ return e => { if(e) e.currentTarget.blur(); if(!$(id).disabled) ACTIONS[id](); }; }
const ACTIONS = {
  "submit": submit, "skip": () => item && post("/api/label", {...base(), skip:true}), "undo": () => post("/api/undo", {}),
  "both-bad": () => item && post("/api/label", {...base(), both_bad:true}),
  "a-better": () => pair(0), "b-better": () => pair(1), "tie": () => pair(null),
};
Object.keys(ACTIONS).forEach(id => $(id).onclick = click(id));
document.addEventListener("keydown", e => {
  if(e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;  // Ctrl+S saves the page; it is no shortcut here
  if(e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA"){ if(e.key === "Escape") e.target.blur(); return; }
  const k = item ? item.completions.length : 0, two = item && item.mode === "rank" && k === 2;
  let act = null;
  if(e.key === "u") act = "undo";
  else if(!item) act = null;
  else if(e.key === "Enter") act = "submit";
  else if(e.key === "s") act = "skip";
  else if(e.key === "b" && item.mode === "rank") act = "both-bad";
  else if(two && e.key === "1") act = "a-better";
  else if(two && e.key === "2") act = "b-better";
  else if(two && e.key === "t") act = "tie";
  else if(item.mode === "rank" && /^[1-9]$/.test(e.key) && Number(e.key) <= k){ choice[cursor] = Number(e.key); cursor = Math.min(cursor + 1, k - 1); paint(); e.preventDefault(); }
  else if(item.mode === "thumbs" && (e.key === "g" || e.key === "x")){ choice[cursor] = e.key === "g"; cursor = Math.min(cursor + 1, k - 1); paint(); e.preventDefault(); }
  if(act){ e.preventDefault(); ACTIONS[act](); }  // preventDefault: Enter must not also press a focused button
});
async function loadHistory(){
  const r = await fetch("/api/history"); if(!r.ok) return;
  const data = await r.json(), list = $("history-list"); list.replaceChildren();
  data.labels.slice(-20).reverse().forEach(l => {
    const li = el("li", "", l.kind + ": " + l.prompt + " ");
    const b = el("button", "", "Change"); b.onclick = () => post("/api/undo", {item:l.item}); li.appendChild(b); list.appendChild(li);
  });
}
$("show-history").onclick = e => { e.preventDefault(); $("history").hidden = !$("history").hidden; };
next();
</script>
"""


def labelling(title: str, csrf: str) -> str:
    return page(title, LABEL_BODY.replace("__TITLE__", html.escape(title)), csrf=csrf)
