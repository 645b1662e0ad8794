// charrnn-inspect page: colours the text by one cell, shows next-character guesses, fills the feature snippets.
// Data layout: see charrnn/inspector/page.py.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("charrnn-data").textContent);
  const text = data.text;
  const T = text.length;

  // states[name] = {layers, hidden, values: Int8Array [T * layers * hidden]}
  const states = {};
  for (const s of data.states) {
    const bin = atob(s.data);
    const bytes = new Int8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = (bin.charCodeAt(i) << 24) >> 24;
    states[s.name] = { label: s.label, layers: s.layers, hidden: s.hidden, values: bytes };
  }
  const value = (st, t, layer, cell) => st.values[(t * st.layers + layer) * st.hidden + cell] / data.scale;

  function colour(v) {
    // Blue below zero, red above; alpha grows with |v| (to 0.8, so dark text stays readable) and zero is the
    // page colour. The same scale as the PNG pictures (inspector/pictures.py).
    const a = (0.8 * Math.min(1, Math.abs(v))).toFixed(3);
    return v < 0 ? `rgba(33, 102, 172, ${a})` : `rgba(214, 47, 39, ${a})`;
  }
  const ink = (v) => (Math.abs(v) >= 0.75 ? "#fff" : "");
  function paint(span, v) {
    span.style.backgroundColor = colour(v);
    span.style.color = ink(v);
  }
  const shown = (ch) => (ch === "\n" ? "\u21b5" : ch === " " ? "\u2423" : ch === "\t" ? "\u21e5" : ch);

  const stateSel = document.getElementById("state");
  const layerSel = document.getElementById("layer");
  const cellIn = document.getElementById("cell");
  const note = document.getElementById("unit-note");
  const panel = document.getElementById("panel");
  const strip = document.getElementById("strip");
  const spans = Array.from(document.getElementById("text").children);
  spans.forEach((s, i) => (s.dataset.i = i));

  for (const s of data.states) stateSel.add(new Option(s.name === "c" ? "c (cell, tanh)" : "h (hidden)", s.name));
  const cur = { state: data.states[0].name, layer: 0, cell: 0, at: -1 };

  // Correlations already computed for the ranked units, shown when one of them is selected.
  const known = {};
  for (const f of data.ranking)
    for (const b of f.best) {
      const r = `${b.r >= 0 ? "+" : ""}${b.r.toFixed(3)}`;
      (known[`${b.state}/${b.layer}/${b.cell}`] ||= []).push(`${f.label}: r = ${r}`);
    }

  function fillLayers() {
    const st = states[cur.state];
    layerSel.innerHTML = "";
    for (let l = 0; l < st.layers; l++) layerSel.add(new Option(String(l + 1), String(l)));
    cur.layer = Math.min(cur.layer, st.layers - 1);
    layerSel.value = String(cur.layer);
    cellIn.max = String(st.hidden - 1);
  }

  function render() {
    const st = states[cur.state];
    cur.cell = Math.max(0, Math.min(st.hidden - 1, cur.cell | 0));
    cellIn.value = String(cur.cell);
    for (let t = 0; t < T; t++) paint(spans[t], value(st, t, cur.layer, cur.cell));
    const k = known[`${cur.state}/${cur.layer}/${cur.cell}`];
    note.textContent = k ? k.join("; ") : "";
    if (cur.at >= 0) show(cur.at);
  }

  function select(state, layer, cell) {
    cur.state = state;
    stateSel.value = state;
    fillLayers();
    cur.layer = layer;
    layerSel.value = String(layer);
    cur.cell = cell;
    render();
  }

  function show(i) {
    cur.at = i;
    for (const s of document.querySelectorAll("#text span.here")) s.classList.remove("here");
    spans[i].classList.add("here");
    const st = states[cur.state];
    const chars = data.top5_chars[i];
    const probs = data.top5_probs[i];
    const next = i + 1 < T ? text[i + 1] : null;
    let rows = "";
    for (let k = 0; k < probs.length; k++) {
      const cls = chars[k] === next ? ' class="actual"' : "";
      rows += `<tr${cls}><td>${esc(shown(chars[k]))}</td><td>${probs[k].toFixed(3)}</td>` +
        `<td class="bar"><div class="barfill" style="width:${(probs[k] * 100).toFixed(1)}%"></div></td></tr>`;
    }
    const actual = next === null ? "end of text" :
      `really next: <b>${esc(shown(next))}</b>, p = ${data.next_prob[i].toFixed(3)}`;
    panel.innerHTML = `<div>character ${i}: <span class="char">${esc(shown(text[i]))}</span></div>` +
      `<div>activation ${value(st, i, cur.layer, cur.cell).toFixed(3)}</div>` +
      `<div style="margin-top:8px">five likeliest next characters</div><table>${rows}</table>` +
      `<div style="margin-top:6px">${actual}</div>`;
    drawStrip(i);
  }

  function drawStrip(i) {
    // The line holding character i (up to 90 columns around it): the text, then the five guesses after each
    // character, each shaded by its probability (the layout of the char-rnn post's figure).
    let a = i === 0 ? 0 : text.lastIndexOf("\n", i - 1) + 1;
    let b = text.indexOf("\n", i);
    b = b < 0 ? T : b + 1;
    if (b - a > 90) { a = Math.max(a, i - 45); b = Math.min(b, a + 90); }
    const st = states[cur.state];
    let html = '<table><tr class="input"><td class="rowname">text</td>';
    for (let t = a; t < b; t++) {
      const v = value(st, t, cur.layer, cur.cell);
      const here = t === i ? ";outline:2px solid #111" : "";
      html += `<td style="background:${colour(v)};color:${ink(v) || "inherit"}${here}">${esc(shown(text[t]))}</td>`;
    }
    html += "</tr>";
    for (let k = 0; k < 5; k++) {
      html += `<tr><td class="rowname">guess ${k + 1}</td>`;
      for (let t = a; t < b; t++) {
        const p = data.top5_probs[t][k];
        const ch = data.top5_chars[t][k];
        if (p === undefined) { html += "<td></td>"; continue; }
        const look = `background:rgba(87, 96, 106, ${(p * 0.85).toFixed(3)});color:${p > 0.5 ? "#fff" : "#1f2328"}`;
        html += `<td title="${esc(shown(ch))} ${p.toFixed(3)}" style="${look}">${esc(shown(ch))}</td>`;
      }
      html += "</tr>";
    }
    strip.innerHTML = html + "</table>";
  }

  function esc(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }

  function fillSnippets() {
    for (const box of document.querySelectorAll(".snippet")) {
      const f = data.ranking.find((r) => r.feature === box.dataset.feature);
      const [a, b] = f.window;
      const frag = document.createDocumentFragment();
      const u = f.best[Number(box.dataset.rank)];
      for (let t = a; t < b; t++) {
        const s = document.createElement("span");
        s.textContent = text[t];
        if (text[t] === "\n") s.className = "nl";
        if (box.dataset.rank === "feature") {
          s.style.backgroundColor = `rgba(46, 160, 67, ${(0.6 * f.values[t - a]).toFixed(3)})`;
        } else {
          paint(s, value(states[u.state], t, u.layer, u.cell));
        }
        frag.appendChild(s);
      }
      box.appendChild(frag);
    }
  }

  stateSel.addEventListener("change", () => { cur.state = stateSel.value; fillLayers(); render(); });
  layerSel.addEventListener("change", () => { cur.layer = Number(layerSel.value); render(); });
  cellIn.addEventListener("change", () => { cur.cell = Number(cellIn.value); render(); });
  document.getElementById("prev").addEventListener("click", () => { cur.cell--; render(); });
  document.getElementById("next").addEventListener("click", () => { cur.cell++; render(); });
  document.addEventListener("keydown", (e) => {
    if (e.target === cellIn || e.target.tagName === "SELECT") return;
    if (e.key === "ArrowLeft") { cur.cell--; render(); }
    if (e.key === "ArrowRight") { cur.cell++; render(); }
  });
  document.getElementById("text").addEventListener("mouseover", (e) => {
    if (e.target.dataset && e.target.dataset.i !== undefined) show(Number(e.target.dataset.i));
  });
  for (const b of document.querySelectorAll("button.pick"))
    b.addEventListener("click", () => {
      select(b.dataset.state, Number(b.dataset.layer), Number(b.dataset.cell));
      document.getElementById("viewer").scrollIntoView({ behavior: "smooth" });
    });

  // Start on the best cell found for the first feature present, else cell 0.
  const first = data.ranking.find((r) => r.present && r.best.length);
  fillLayers();
  if (first) select(first.best[0].state, first.best[0].layer, first.best[0].cell); else render();
  fillSnippets();
  show(Math.max(0, text.search(/[^\n]{20}/)));  // the strip starts on the first line of some length
})();
