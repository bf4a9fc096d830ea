// The route graph as a Streamlit custom component (v2): a τ step redraws in the browser.
//
// data (app/views/route_graph.py): `figure` (JSON of the server's figure at the server's τ,
// llm_flow.io.figure.flow_figure), `threshold`, `compact`, `selected`, `version` and `route`
// (app/figures/route_data.py: the edges any τ ≥ route.floor can keep). The server's figure is
// drawn whenever the server's state differs from what is shown; when the page's τ slider moves,
// the route is found here (findRoute = llm_flow.engine.routes.find_route) and drawn at once,
// before the server's fragment rerun (which then brings the same route for the panels).
// A click sends the clicked element's id (the figure's customdata) as the trigger `clicked`.

const SLIDER_LABEL = "Threshold τ";

function loadPlotly(url) {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!window.__llmFlowPlotly) {
    window.__llmFlowPlotly = new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = url;
      script.onload = () => resolve(window.Plotly);
      script.onerror = () => reject(new Error("plotly.js did not load from " + url));
      document.head.appendChild(script);
    });
  }
  return window.__llmFlowPlotly;
}

// base64 of little-endian int32 / float32 values (app/figures/route_data.py: packed).
function unpack(text, Type) {
  const raw = atob(text), bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return new Type(bytes.buffer);
}

// Decode the arrays and index the attention edges by row (layer, target): [start, end).
export function prepare(packed) {
  const a = {
    layer: unpack(packed.attention.layer, Int32Array),
    target: unpack(packed.attention.target, Int32Array),
    source: unpack(packed.attention.source, Int32Array),
    weight: unpack(packed.attention.weight, Float32Array),
  };
  const route = { ...packed, attention: a };
  for (const name of ["attn_residual", "ffn", "ffn_residual"]) route[name] = unpack(packed[name], Float32Array);
  const L = route.n_layers, T = route.n_tokens;
  const start = new Int32Array(L * T).fill(-1), end = new Int32Array(L * T);
  for (let e = 0; e < a.layer.length; e++) {
    const row = a.layer[e] * T + a.target[e];
    if (start[row] < 0) start[row] = e;
    end[row] = e + 1;
  }
  return { ...route, start, end };
}

const inverse = (total) => (total > 0 ? 1 / Math.max(total, 1e-30) : 0);

// find_route on the client's arrays: top-down from the output node, layer by layer, edges kept
// where their original weight ≥ τ (compared in float32, as torch does) and their target is on
// the route; renormalizing rescales each whole's surviving parts to sum to 1.
export function findRoute(d, threshold) {
  const L = d.n_layers, T = d.n_tokens, tau = Math.fround(threshold), a = d.attention;
  const mask = () => new Uint8Array(L * T);
  const r = {
    attention: [], // [layer, t, s, weight]
    attnResidual: mask(), ffn: mask(), ffnResidual: mask(),
    afterAttention: mask(), afterLayer: mask(),
    attnFactor: new Float64Array(L * T).fill(1), ffnFactor: new Float64Array(L * T).fill(1),
    embeddings: new Uint8Array(T),
  };
  let active = new Uint8Array(T);
  active[d.position] = 1;
  for (let layer = L - 1; layer >= 0; layer--) {
    const next = new Uint8Array(T);
    const rows = [];
    for (let t = 0; t < T; t++) {
      if (!active[t]) continue;
      const i = layer * T + t;
      r.afterLayer[i] = 1;
      const keepFfn = d.ffn[i] >= tau, keepRes = d.ffn_residual[i] >= tau;
      r.ffn[i] = keepFfn; r.ffnResidual[i] = keepRes;
      if (d.renormalize) {
        r.ffnFactor[i] = inverse((keepFfn ? d.ffn[i] : 0) + (keepRes ? d.ffn_residual[i] : 0));
      }
      if (keepFfn || keepRes) rows.push(t);
    }
    const edges = [];
    for (const t of rows) {
      const i = layer * T + t;
      r.afterAttention[i] = 1;
      const keepRes = d.attn_residual[i] >= tau;
      r.attnResidual[i] = keepRes;
      if (keepRes) next[t] = 1;
      let total = keepRes ? d.attn_residual[i] : 0;
      const first = edges.length;
      if (d.start[i] >= 0) {
        for (let e = d.start[i]; e < d.end[i]; e++) {
          if (a.weight[e] < tau) continue;
          edges.push([layer, t, a.source[e], a.weight[e]]);
          total += a.weight[e];
          next[a.source[e]] = 1;
        }
      }
      if (d.renormalize) {
        r.attnFactor[i] = inverse(total);
        for (let k = first; k < edges.length; k++) edges[k][3] *= r.attnFactor[i];
      }
    }
    r.attention.unshift(...edges);
    active = next;
  }
  r.embeddings = active;
  return r;
}

// -- the picture (llm_flow.io.layout, plot and figure, for what a τ step changes) -----------

function columns(d, r, selected, compact) {
  const T = d.n_tokens, x = new Float64Array(T).fill(NaN);
  if (!compact) {
    for (let t = 0; t < T; t++) x[t] = t;
    return { x, tokens: [...Array(T).keys()], gaps: [] };
  }
  const shown = new Uint8Array(T);
  shown[d.position] = 1;
  for (let t = 0; t < T; t++) {
    if (r.embeddings[t]) shown[t] = 1;
    for (let l = 0; l < d.n_layers && !shown[t]; l++) {
      const i = l * T + t;
      if (r.afterAttention[i] || r.afterLayer[i]) shown[t] = 1;
    }
  }
  if (selected) for (const t of selected.tokens) if (t >= 0 && t < T) shown[t] = 1;
  const tokens = [];
  for (let t = 0; t < T; t++) if (shown[t]) { x[t] = tokens.length; tokens.push(t); }
  const bounds = [-1, ...tokens, T], gaps = [];
  for (let c = 0; c + 1 < bounds.length; c++) {
    if (bounds[c + 1] - bounds[c] > 1) gaps.push({ x: c - 0.5, first: bounds[c] + 1, last: bounds[c + 1] - 1 });
  }
  return { x, tokens, gaps };
}

// Each trace keeps one uid across redraws, the server's figure's and the browser's alike: plotly.js
// pairs a redraw's traces with the drawn ones by uid (by index without), so a weight bin that
// empties no longer shifts every later trace onto another's SVG group and its points are not
// rebuilt (τ steps 10-25 % faster, measured in the app). What tells traces apart: their group,
// name, mode, line width (the weight bin) and marker size.
function keyed(traces) {
  return traces.map((t) => {
    const size = t.marker && typeof t.marker.size === "number" ? t.marker.size : "";
    const width = t.line && typeof t.line.width === "number" ? t.line.width.toFixed(3) : "";
    const key = [t.legendgroup, t.name, t.mode, width, size].map((v) => v ?? "").join("_");
    return { ...t, uid: "u" + key.replace(/[^A-Za-z0-9]/g, (c) => "-" + c.charCodeAt(0) + "-") };
  });
}

// Drawn on a WebGL canvas where the browser has one: plotly.js styles every SVG point one by
// one (parsing its colour each time), so a τ step on a 400-token route (~2,000 markers, ~2,000
// edge segments) took ~230 ms of SVG work and takes ~60 ms on a canvas (headless Chromium on the
// 2-core machine, software WebGL; issue 12). Texts stay SVG: the canvas clips them to the plot
// area (the chosen position's prediction sits above it), so a trace with markers and texts is
// split into its markers on the canvas and its texts in SVG, which hover skips (hover compares
// canvas points by their centres and SVG points by their edges: mixed, an SVG marker next to a
// canvas one would win). Without WebGL the figure stays SVG, as the server's figure is exported
// (llm_flow.io.figure).
function onCanvas(traces, invisible) {
  if (window.__llmFlowWebgl === undefined) {
    const gl = document.createElement("canvas").getContext("webgl");
    window.__llmFlowWebgl = !!gl;
    const probe = gl && gl.getExtension("WEBGL_lose_context"); // give the probe's context back
    if (probe) probe.loseContext();
  }
  if (!window.__llmFlowWebgl) return traces;
  return traces.flatMap((t) => {
    const modes = String(t.mode).split("+");
    if (t.type !== "scatter" || !modes.some((m) => m !== "text")) return [t];
    const drawn = { ...t, type: "scattergl", mode: modes.filter((m) => m !== "text").join("+") };
    if (!modes.includes("text")) return [drawn];
    // The texts keep their markers, invisible, which place them (textposition) as drawn; only
    // points with a text are kept (the output row's blanks made plotly.js style ~60 empty texts
    // on every τ step).
    const keep = Array.isArray(t.text) ? t.text.map((text) => String(text).trim() !== "") : null;
    const pick = (values) => (keep && Array.isArray(values) ? values.filter((_, k) => keep[k]) : values);
    const marker = { ...t.marker, color: invisible, size: pick(t.marker && t.marker.size) };
    const texts = { type: "scatter", mode: t.mode, x: pick(t.x), y: pick(t.y), text: pick(t.text),
      textposition: pick(t.textposition), textfont: t.textfont, marker, cliponaxis: false, hoverinfo: "skip",
      showlegend: false, name: `${t.name} (text)`, uid: `${t.uid}-text` };
    delete drawn.text;
    return [drawn, texts];
  });
}

// The canvas at the screen's resolution: plotly.js draws WebGL at twice it by default
// (plotGlPixelRatio 2), four times the pixels, which a software WebGL (a machine without a GPU)
// rasterizes on the CPU: ~35 ms of each τ step on a 400-token route (issue 12). The toolbar's
// camera, whose image embeds the canvas, follows the same ratio; the page's downloads are vector.
const drawConfig = (config) => ({ ...config, plotGlPixelRatio: Math.max(1, window.devicePixelRatio || 1) });

function picture(d, r, selected, compact, baseLayout) {
  const s = d.style, T = d.n_tokens, L = d.n_layers, tok = d.tokens;
  const cols = columns(d, r, selected, compact);
  const X = cols.x;
  const y = (kind, layer) => s.rows_per_layer * layer + s.rows[kind];
  const nx = (kind, t) => X[t] + (kind === "M" ? s.ffn_offset : 0);
  const nid = (kind, l, t) => (kind === "X" ? `X0_${t}` : `${kind}${l}_${t}`);
  const src = (l, t) => (l === 0 ? nid("X", 0, t) : nid("I", l - 1, t));
  const nodeText = (kind, l, t) =>
    `<b>${nid(kind, l, t)}</b> ${kind === "X" ? "" : `layer ${l} · `}${s.node_words[kind]}<br>token ${t}: ${tok[t]}`;
  // Hex, as llm_flow.io.plot.css_rgb: plotly.js parses a marker's colour for every point.
  const css = (rgb) => `#${rgb.map((c) => c.toString(16).padStart(2, "0")).join("")}`;
  const traces = [];
  const markers = (xs, ys, ids, texts, group, marker, name, showlegend = false) => ({
    type: "scatter", x: xs, y: ys, mode: "markers", marker, customdata: ids, hovertext: texts,
    hovertemplate: "%{hovertext}<extra></extra>", name, legendgroup: group, showlegend,
    selected: { marker: { opacity: marker.opacity ?? 1 } },
    unselected: { marker: { opacity: marker.opacity ?? 1 } },
  });
  const handles = (xs, ys, ids, texts, group) =>
    markers(xs, ys, ids, texts, group, { size: 11, color: s.invisible });

  // A node on the route names the weight of the residual edge into it: residual edges have no
  // click handles (one marker per edge made each redraw ~40 % slower).
  const residualIn = { A: [r.attnResidual, d.attn_residual, r.attnFactor],
                       I: [r.ffnResidual, d.ffn_residual, r.ffnFactor] };
  const residualNodes = (onRoute) => {
    const out = { x: [], y: [], ids: [], texts: [] };
    const add = (kind, l, t) => {
      if (Number.isNaN(X[t])) return;
      out.x.push(nx(kind, t)); out.y.push(y(kind, l));
      out.ids.push(nid(kind, l, t));
      let text = nodeText(kind, l, t);
      const into = onRoute && residualIn[kind];
      if (into && into[0][l * T + t]) {
        text += `<br>residual in: weight ${(into[1][l * T + t] * into[2][l * T + t]).toFixed(3)}`;
      }
      out.texts.push(text);
    };
    for (let t = 0; t < T; t++) if (!!r.embeddings[t] === onRoute) add("X", 0, t);
    for (const [kind, m] of [["A", r.afterAttention], ["I", r.afterLayer]]) {
      for (let l = 0; l < L; l++) for (let t = 0; t < T; t++) if (!!m[l * T + t] === onRoute) add(kind, l, t);
    }
    return out;
  };
  if (2 * L * cols.tokens.length <= s.max_grid_nodes) {
    const g = residualNodes(false);
    traces.push(markers(g.x, g.y, g.ids, g.texts, "nodes",
      { size: 4, color: s.node_colour, symbol: "circle", opacity: 0.3 }, "residual (off route)"));
  }

  // Edges as polylines [[x, y], ...] with their weights, per kind.
  const residual = { lines: [], weights: [] }, ffn = { lines: [], weights: [] };
  const attention = { lines: [], weights: [] };
  for (const [into, m, w, f] of [["A", r.attnResidual, d.attn_residual, r.attnFactor],
                                  ["I", r.ffnResidual, d.ffn_residual, r.ffnFactor]]) {
    for (let l = 0; l < L; l++) for (let t = 0; t < T; t++) {
      const i = l * T + t;
      if (!m[i]) continue;
      const [y0, y1] = into === "A" ? [s.rows_per_layer * l, y("A", l)] : [y("A", l), y("I", l)];
      const weight = w[i] * f[i];
      residual.lines.push([[X[t], y0], [X[t], y1]]); residual.weights.push(weight);
    }
  }
  const squares = { x: [], y: [], ids: [], texts: [] };
  for (let l = 0; l < L; l++) for (let t = 0; t < T; t++) {
    const i = l * T + t;
    if (!r.ffn[i]) continue;
    const weight = d.ffn[i] * r.ffnFactor[i];
    ffn.lines.push(["A", "M", "I"].map((k) => [nx(k, t), y(k, l)])); ffn.weights.push(weight);
    squares.x.push(nx("M", t)); squares.y.push(y("M", l)); squares.ids.push(nid("M", l, t));
    squares.texts.push(`${nodeText("M", l, t)}<br>weight ${weight.toFixed(3)}`);
  }
  const attHandles = { x: [], y: [], ids: [], texts: [] };
  const attentionPoints = (l, t, st) => {
    const y0 = s.rows_per_layer * l, y1 = y("A", l), xt = X[t], xs = X[st];
    const mid = t === st ? xt - s.self_bow : (xs + xt) / 2;
    return [[xs, y0], [mid, (y0 + y1) / 2], [xt, y1]];
  };
  const attentionHandle = (l, t, st) => {
    const y0 = s.rows_per_layer * l, y1 = y("A", l), xt = X[t], xs = X[st];
    return t === st ? [xt - s.self_bow, (y0 + y1) / 2]
      : [xs + s.handle_at * (xt - xs), y0 + s.handle_at * (y1 - y0)];
  };
  for (const [l, t, st, weight] of r.attention) {
    attention.lines.push(attentionPoints(l, t, st)); attention.weights.push(weight);
    const [hx, hy] = attentionHandle(l, t, st);
    attHandles.x.push(hx); attHandles.y.push(hy); attHandles.ids.push(`${src(l, st)}->${nid("A", l, t)}`);
    attHandles.texts.push(`<b>attention</b> ${src(l, st)} → ${nid("A", l, t)}<br>${tok[st]} → ${tok[t]}, weight ${weight.toFixed(3)}`);
  }
  const B = s.n_weight_bins;
  for (const [name, group, rgb, edges] of [["residual", "residual", s.residual_rgb, residual],
    ["FFN", "ffn", s.ffn_rgb, ffn], ["attention", "attention", s.attention_rgb, attention]]) {
    traces.push({ type: "scatter", x: [null], y: [null], mode: "lines",
      line: { color: css(rgb), width: 3 }, name, legendgroup: group });
    const bins = Array.from({ length: B }, () => ({ x: [], y: [] }));
    edges.lines.forEach((line, e) => {
      const level = Math.sqrt(Math.min(Math.max(edges.weights[e], 0), 1));
      const bin = bins[Math.min(Math.floor(level * B), B - 1)];
      for (const [px, py] of line) { bin.x.push(px); bin.y.push(py); }
      bin.x.push(null); bin.y.push(null);
    });
    bins.forEach((bin, b) => {
      if (!bin.x.length) return;
      const level = (b + 0.5) / B;
      traces.push({ type: "scatter", x: bin.x, y: bin.y, mode: "lines",
        line: { width: 1 + 6 * level ** 2, color: `rgba(${rgb[0]}, ${rgb[1]}, ${rgb[2]}, ${(0.45 + 0.55 * level).toFixed(2)})` },
        hoverinfo: "skip", showlegend: false, legendgroup: group });
    });
  }
  traces.push(handles(attHandles.x, attHandles.y, attHandles.ids, attHandles.texts, "attention"));
  traces.push(markers(squares.x, squares.y, squares.ids, squares.texts, "ffn",
    { size: 8, color: css(s.ffn_rgb), symbol: "square" }, "FFN block"));
  // After-attention nodes smaller, in their own trace: one size per trace lets plotly.js style
  // it once rather than point by point (llm_flow.io.route_shapes.route_nodes).
  const on = residualNodes(true);
  for (const [afterAttention, size, name, legend] of [[true, 5, "residual node after attention", false],
                                                      [false, 8, "residual node", true]]) {
    const keep = on.ids.map((i) => i.startsWith("A") === afterAttention);
    const pick = (values) => values.filter((_, k) => keep[k]);
    traces.push(markers(pick(on.x), pick(on.y), pick(on.ids), pick(on.texts), "nodes",
      { size, color: s.node_colour, symbol: "circle" }, name, legend));
  }
  const chosen = cols.tokens.map((t) => t === d.position);
  traces.push({
    type: "scatter", x: cols.tokens.map((t) => X[t]), y: cols.tokens.map(() => y("A", L)),
    mode: "markers+text",
    marker: { symbol: "triangle-down", size: chosen.map((c) => (c ? 15 : 10)),
      color: chosen.map((c) => (c ? s.highlight : s.node_colour)) },
    text: cols.tokens.map((t, k) => (chosen[k] ? d.predictions[t] : " ")), // " ": figure._output_row
    textposition: "top center", textfont: { color: s.highlight },
    customdata: cols.tokens.map((t) => `${s.position_prefix}${t}`),
    hovertext: cols.tokens.map((t) => `<b>output position ${t}</b> after ${tok[t]}<br>predicts ${d.predictions[t]} (p = ${d.probs[t].toFixed(2)})<br>click to draw its route`),
    hovertemplate: "%{hovertext}<extra></extra>", name: "output position", showlegend: false,
    selected: { marker: { opacity: 1 } }, unselected: { marker: { opacity: 1 } }, cliponaxis: false,
  });
  if (selected) {
    let at;
    if (selected.edge) {
      const [l, t, st] = selected.edge, pts = attentionPoints(l, t, st);
      traces.push({ type: "scatter", x: pts.map((p) => p[0]), y: pts.map((p) => p[1]), mode: "lines",
        line: { color: s.highlight, width: 3, dash: "dot" }, hoverinfo: "skip", showlegend: false });
      // A ring on each end (on the bow of an s = t edge): the handle of a long edge can sit
      // on a third token's column.
      at = t === st ? [attentionHandle(l, t, st)] : [pts[0], pts[pts.length - 1]];
    } else {
      at = [[nx(selected.kind, selected.token), y(selected.kind, selected.layer)]];
    }
    traces.push({ type: "scatter", x: at.map((p) => p[0]), y: at.map((p) => p[1]), mode: "markers", hoverinfo: "skip", showlegend: false,
      marker: { symbol: "circle-open", size: 18, color: s.highlight, line: { width: 3, color: s.highlight } } });
  }
  if (cols.gaps.length) {
    const top = y("A", L) + 0.5, lx = [], ly = [];
    for (const g of cols.gaps) { lx.push(g.x, g.x, null); ly.push(-0.6, top, null); }
    traces.push({ type: "scatter", x: lx, y: ly, mode: "lines", hoverinfo: "skip", showlegend: false,
      line: { color: "rgba(128, 128, 128, 0.45)", width: 1, dash: "dot" }, name: "hidden tokens" });
    traces.push({ type: "scatter", x: cols.gaps.map((g) => g.x), y: cols.gaps.map(() => -0.55),
      mode: "text", text: cols.gaps.map(() => "⋯"), textfont: { color: "rgb(128, 128, 128)", size: 14 },
      hovertext: cols.gaps.map((g) => {
        const n = g.last - g.first + 1;
        return `${n} token${n > 1 ? "s" : ""} not on the route: ${n > 1 ? `${g.first}–${g.last}` : g.first}`;
      }),
      hovertemplate: "%{hovertext}<extra></extra>", showlegend: false, name: "hidden tokens" });
  }
  // The token axis follows the columns (llm_flow.io.layout.token_ticks and x_window).
  const n = cols.tokens.length, V = s.max_visible_tokens;
  let range;
  if (compact || n <= V) range = [-0.7, n - 0.4];
  else { const high = Math.max(X[d.position], V - 1); range = [high - V + 0.6, high + 0.6]; }
  const visible = cols.tokens.filter((t) => X[t] >= range[0] && X[t] <= range[1]).length;
  const step = Math.max(1, Math.ceil(visible / s.max_tick_labels));
  const ticks = new Set(cols.tokens.filter((_, k) => k % step === 0));
  ticks.add(d.position);
  const sorted = [...ticks].sort((p, q) => p - q);
  const layout = { ...baseLayout, xaxis: { ...baseLayout.xaxis, range,
    tickvals: sorted.map((t) => X[t]), ticktext: sorted.map((t) => tok[t]) } };
  if (!compact) layout.xaxis.range = baseLayout.xaxis.range; // the full view keeps its pan
  return { data: keyed(traces), layout };
}

// -- the component --------------------------------------------------------------------------

// The page's theme (Streamlit's CSS variables), as st.plotly_chart would apply it: a dark theme
// gets light text on a transparent background.
function themed(layout, element) {
  const css = getComputedStyle(element);
  const text = css.getPropertyValue("--st-text-color").trim();
  const font = css.getPropertyValue("--st-font").trim();
  return {
    ...layout,
    paper_bgcolor: "rgba(0, 0, 0, 0)",
    plot_bgcolor: "rgba(0, 0, 0, 0)",
    font: { ...(layout.font || {}), ...(text ? { color: text } : {}), ...(font ? { family: font } : {}) },
    // Room for the token labels inside the figure's height, as st.plotly_chart's theme makes.
    xaxis: { ...layout.xaxis, automargin: true },
    yaxis: { ...layout.yaxis, automargin: true },
  };
}

function sliderOf(doc) {
  for (const box of doc.querySelectorAll('[data-testid="stSlider"]')) {
    if (box.innerText.includes(SLIDER_LABEL)) return box.querySelector('input[type="range"]');
  }
  return null;
}

export default function (component) {
  const { data, parentElement, setTriggerValue } = component;
  // The graph's div (and what it shows) outlives a rerun's call of this function.
  let gd = parentElement.querySelector("div.llm-flow-route");
  if (!gd) {
    gd = document.createElement("div");
    gd.className = "llm-flow-route";
    parentElement.appendChild(gd);
    gd.__llmFlow = { gd, drawn: null, version: null, prepared: null, slider: null, observer: null };
  }
  const state = gd.__llmFlow;
  state.data = data;
  if (state.version !== data.version) {
    state.prepared = prepare(data.route);
    state.version = data.version;
  }
  const server = JSON.stringify([data.version, data.threshold, data.compact, data.selected]);

  const drawClient = (tau) => {
    const Plotly = window.Plotly;
    if (!Plotly || !state.prepared || tau < state.prepared.floor) return; // the server draws
    const key = JSON.stringify([state.data.version, tau, state.data.compact, state.data.selected]);
    if (state.drawn === key) return;
    const started = performance.now();
    const route = findRoute(state.prepared, tau);
    const fig = picture(state.prepared, route, state.data.selected, state.data.compact, state.layout);
    const built = performance.now();
    // Keep the margins the last drawing grew to fit its labels, without automargin: its extra
    // layout passes made the first steps after a page load take 0.3–0.5 s (measured, issue 12).
    const layout = themed(fig.layout, parentElement);
    const size = state.gd._fullLayout && state.gd._fullLayout._size;
    if (size) {
      layout.margin = { ...layout.margin, l: size.l, r: size.r, t: size.t, b: size.b };
      layout.xaxis.automargin = false; layout.yaxis.automargin = false;
    }
    Plotly.react(state.gd, onCanvas(fig.data, state.prepared.style.invisible), layout, drawConfig(state.data.config));
    state.drawn = key;
    // The full view of a long prompt labels edges from off-screen sources ("← s"), which only
    // the server's figure has: take it when the server answers at this τ.
    state.approximate = !state.data.compact && state.prepared.n_tokens > state.prepared.style.max_visible_tokens;
    // What the latency test reads: when a client-side redraw started and what it cost.
    window.__llmFlowRedraw = { tau, started, build_ms: built - started, ms: performance.now() - started };
  };

  // The latest call's functions, for the listeners attached once (and for the latency test:
  // the client's route and redraw at any τ).
  state.findRoute = (tau) => findRoute(state.prepared, tau);
  state.draw = drawClient;
  state.setTriggerValue = setTriggerValue;

  loadPlotly(data.plotly_url).then((Plotly) => {
    if (state.drawn !== server || state.approximate) {
      const fig = JSON.parse(data.figure);
      state.layout = fig.layout;
      Plotly.react(state.gd, onCanvas(keyed(fig.data), state.prepared.style.invisible), themed(fig.layout, parentElement), drawConfig(data.config));
      state.drawn = server;
      state.approximate = false;
    } else if (!state.layout) {
      state.layout = JSON.parse(data.figure).layout;
    }
    if (!state.clicks) {
      state.gd.on("plotly_click", (event) => {
        const point = event && event.points && event.points[0];
        let id = point ? point.customdata : null;
        if (Array.isArray(id)) id = id[0];
        if (typeof id === "string" && id) state.setTriggerValue("clicked", id);
      });
      state.clicks = true;
    }
    // Follow the page's τ slider as it moves, before the server hears of it.
    const slider = sliderOf(document);
    if (slider && slider !== state.slider) {
      if (state.observer) state.observer.disconnect();
      state.observer = new MutationObserver(() => {
        const tau = Number(slider.value);
        if (Number.isFinite(tau)) state.draw(tau);
      });
      state.observer.observe(slider, { attributes: true, attributeFilter: ["aria-valuetext", "value"] });
      state.slider = slider;
    }
  });
  return () => {
    if (state.observer) state.observer.disconnect();
    state.slider = null;
  };
}
