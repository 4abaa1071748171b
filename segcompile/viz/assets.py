"""The stylesheet and script inlined into every page (written for segcompile; no third-party code).

Kept as Python strings so that they travel with the package without package-data settings.
The script reads the page's JSON (``<script type="application/json" id="graph-data">``),
builds the module tree, the cluster map and the details panel, and records any error in
``#errors`` (the browser test asserts that it stays empty) before ``data-rendered="1"`` is set
on ``<body>``.
"""

STYLE = r"""
:root { --added:#1a7f37; --added-bg:#dafbe1; --removed:#cf222e; --removed-bg:#ffebe9; --rewired:#bc4c00;
  --rewired-bg:#fff1e5; --modified:#0969da; --modified-bg:#ddf4ff; --attn:#8250df; --attn-bg:#fbefff;
  --state:#0f766e; --state-bg:#ccfbf1; --line:#d0d7de; --muted:#57606a; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { margin:0; font:13px/1.4 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif; color:#1f2328; }
code, .mono, .node, pre { font-family: ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace; font-size:12px; }
header { padding:8px 14px; border-bottom:1px solid var(--line); background:var(--bg); }
header h1 { font-size:16px; margin:0 12px 0 0; display:inline-block; }
header .sub { color:var(--muted); }
nav.passes { display:inline-flex; gap:4px; flex-wrap:wrap; vertical-align:middle; }
nav.passes a { padding:2px 8px; border:1px solid var(--line); border-radius:12px; text-decoration:none; color:#1f2328; background:#fff; }
nav.passes a.current { background:#1f2328; color:#fff; border-color:#1f2328; }
.toolbar { margin-top:6px; display:flex; gap:10px; align-items:center; flex-wrap:wrap; }
.toolbar input[type=search] { width:260px; padding:3px 6px; border:1px solid var(--line); border-radius:4px; }
.toolbar button { padding:2px 8px; border:1px solid var(--line); border-radius:4px; background:#fff; cursor:pointer; }
.legend span { margin-right:8px; white-space:nowrap; }
.sw { display:inline-block; width:10px; height:10px; border-radius:2px; vertical-align:-1px; margin-right:3px; border:1px solid transparent; }
body.pass-page { height:100vh; display:flex; flex-direction:column; }
main { flex:1; min-height:0; display:grid; grid-template-columns: 250px minmax(0,1fr) 420px; }
main > section { overflow:auto; padding:8px 10px; border-right:1px solid var(--line); }
#map svg { display:block; }
#map .box rect { fill:#fff; stroke:#8c959f; }
#map .box.changed rect { stroke:var(--rewired); stroke-width:1.5; }
#map .box.has-attn rect { fill:var(--attn-bg); }
#map .box:hover rect, #map .box.current rect { stroke:#1f2328; stroke-width:2; }
#map .box { cursor:pointer; }
#map text { font-size:11px; fill:#1f2328; }
#map .arc { fill:none; stroke:#8c959f; stroke-opacity:.45; }
#map .arc.hot { stroke:var(--attn); stroke-opacity:.9; stroke-width:1.5; }
details.group { margin-left:12px; }
details.group.cluster { margin-left:0; border-top:1px solid #eaeef2; }
details.group > summary { cursor:pointer; padding:2px 0; white-space:nowrap; }
details.group.cluster > summary { font-weight:600; }
summary .cls { color:var(--muted); font-weight:normal; }
summary .count { color:var(--muted); font-weight:normal; font-size:11px; }
.badge { display:inline-block; font-size:10.5px; line-height:15px; padding:0 5px; border-radius:8px; margin-left:4px; font-weight:600; font-family:system-ui,sans-serif; }
.b-added { background:var(--added-bg); color:var(--added); }
.b-removed { background:var(--removed-bg); color:var(--removed); }
.b-rewired { background:var(--rewired-bg); color:var(--rewired); }
.b-modified { background:var(--modified-bg); color:var(--modified); }
.b-attn { background:var(--attn-bg); color:var(--attn); }
.b-state { background:var(--state-bg); color:var(--state); }
.node { display:flex; gap:10px; margin-left:14px; padding:1px 4px; border-left:3px solid transparent; cursor:pointer; white-space:nowrap; }
.node:hover { background:var(--bg); }
.node.selected { background:#fff8c5; outline:1px solid #d4a72c; }
.node .nm { min-width:220px; }
.node .tg { color:#0550ae; min-width:260px; overflow:hidden; text-overflow:ellipsis; }
.node .val { color:var(--muted); }
.node .mod { color:var(--muted); font-style:italic; }
.node[data-diff=added] { border-left-color:var(--added); background:var(--added-bg); }
.node[data-diff=removed] { border-left-color:var(--removed); background:var(--removed-bg); }
.node[data-diff=removed] .nm, .node[data-diff=removed] .tg { text-decoration:line-through; }
.node[data-diff=rewired] { border-left-color:var(--rewired); background:var(--rewired-bg); }
.node[data-diff=modified] { border-left-color:var(--modified); background:var(--modified-bg); }
.node[data-kind=attention] .nm, .node[data-kind=segment_attention] .nm { color:var(--attn); font-weight:700; }
.node[data-kind=state_in] .nm, .node[data-kind=state_out] .nm { color:var(--state); font-weight:700; }
.hidden { display:none !important; }
#details h2 { font-size:14px; margin:4px 0 8px; word-break:break-all; }
#details table { border-collapse:collapse; width:100%; }
#details th { text-align:left; vertical-align:top; color:var(--muted); font-weight:normal; padding:2px 8px 2px 0; white-space:nowrap; width:1%; }
#details td { padding:2px 0; word-break:break-word; }
#details h3 { font-size:12px; margin:12px 0 4px; color:var(--muted); text-transform:uppercase; letter-spacing:.04em; }
#details a { color:#0969da; cursor:pointer; text-decoration:none; }
#details .empty { color:var(--muted); }
#details ul { margin:0; padding-left:16px; }
#errors { margin:0; padding:6px 14px; background:var(--removed-bg); color:var(--removed); white-space:pre-wrap; }
#errors:empty { display:none; }
.index { padding:10px 18px; max-width:1200px; }
.index table { border-collapse:collapse; margin:6px 0 16px; }
.index th, .index td { border-bottom:1px solid #eaeef2; padding:4px 12px 4px 0; text-align:left; }
.index th { color:var(--muted); font-weight:600; }
.index td.num { text-align:right; font-variant-numeric:tabular-nums; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  var errorsEl = document.getElementById("errors");
  function report(message) { errorsEl.textContent += message + "\n"; }
  window.addEventListener("error", function (e) {
    report("error: " + e.message + (e.filename ? " (" + e.filename + ":" + e.lineno + ")" : ""));
  });
  window.addEventListener("unhandledrejection", function (e) { report("unhandled rejection: " + e.reason); });

  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  function badge(cls, text, title) {
    return '<span class="badge ' + cls + '"' + (title ? ' title="' + esc(title) + '"' : "") + ">" + esc(text) + "</span>";
  }
  function listText(xs) { return "[" + xs.join(", ") + "]"; }
  var STATUS_SIGN = { added: "+", removed: "\u2212", rewired: "~", modified: "*" };

  function render(data) {
    var nodes = data.nodes, byName = {}, users = {};
    nodes.forEach(function (n) { byName[n.n] = n; users[n.n] = []; });
    nodes.forEach(function (n) {
      (n.i || []).forEach(function (src) { if (users[src] && users[src].indexOf(n.n) < 0) users[src].push(n.n); });
    });

    // ---- tree: clusters, then submodules inside a cluster, nodes in graph order ----------------
    function newGroup(key, label, cls, isCluster) {
      return { key: key, label: label, cls: cls, cluster: isCluster, items: [], sub: {}, stats: {} };
    }
    var root = newGroup("", "", "", false), clusterGroups = {};
    function bump(g, key) { g.stats[key] = (g.stats[key] || 0) + 1; }
    nodes.forEach(function (n) {
      var cid = data.clusters[n.c].id, cg = clusterGroups[cid];
      if (!cg) {
        cg = clusterGroups[cid] = newGroup(cid, data.clusters[n.c].label, "", true);
        cg.short = data.clusters[n.c].short;
        cg.order = n.c;
        root.items.push(cg);
      }
      var chain = [cg], g = cg, m = n.m || "";
      if (m && m !== cid && m.indexOf(cid + ".") === 0) {
        var path = cid;
        m.slice(cid.length + 1).split(".").forEach(function (part) {
          path += "." + part;
          if (!g.sub[part]) {
            g.sub[part] = newGroup(path, part, data.modules[path] || "", false);
            g.items.push(g.sub[part]);
          }
          g = g.sub[part];
          chain.push(g);
        });
      }
      g.items.push(n);
      chain.forEach(function (grp) {
        bump(grp, "nodes");
        if (n.d) bump(grp, n.d);
        if (n.k === "attention" || n.k === "segment_attention") bump(grp, "attn");
        if (n.x && n.x.state) bump(grp, "state_" + n.x.state.direction);
      });
    });

    root.items.sort(function (a, b) { return a.order - b.order; });  // the clusters' order in the data

    function groupBadges(s) {
      var out = "";
      ["added", "removed", "rewired", "modified"].forEach(function (k) {
        if (s[k]) out += badge("b-" + k, STATUS_SIGN[k] + s[k], s[k] + " " + k);
      });
      if (s.attn) out += badge("b-attn", "attention", s.attn + " attention node(s)");
      if (s.state_in || s.state_out) {
        out += badge("b-state", "state " + (s.state_in || 0) + " in / " + (s.state_out || 0) + " out",
                     "carried-state inputs / outputs of the segment-step graph");
      }
      return out;
    }
    function nodeBadges(n) {
      var out = "";
      if (n.d) out += badge("b-" + n.d, n.d);
      var a = n.x && n.x.attention;
      if (a) {
        var plan = a.long_range.length ? "long-range KV " + listText(a.long_range) : "all KV heads local";
        out += badge("b-attn", (n.k === "segment_attention" ? "segment_attention" : "attention") + " L" + a.layer,
                     plan + (a.impl ? ", impl " + a.impl : ""));
      }
      var st = n.x && n.x.state;
      if (st) out += badge("b-state", "state " + st.direction + " L" + st.layer + " " + st.name);
      return out;
    }
    function nodeRow(n, moduleHint) {
      var tgt = n.o === "call_function" ? (n.t || "").replace(/\.default$/, "") : n.o;
      return '<div class="node" data-name="' + esc(n.n) + '" data-kind="' + n.k + '"' +
        (n.d ? ' data-diff="' + n.d + '"' : "") + ">" +
        '<span class="nm">' + esc(n.n) + "</span>" + '<span class="tg">' + esc(tgt) + "</span>" +
        (moduleHint ? '<span class="mod">' + esc(moduleHint) + "</span>" : "") +
        '<span class="val">' + esc(n.v || "") + "</span>" + nodeBadges(n) + "</div>";
    }
    function groupHtml(g) {
      var html = "";
      g.items.forEach(function (item) {
        if (item.items === undefined) { html += nodeRow(item, ""); return; }
        // a submodule holding a single node: show the node, named by its module, not a folder
        if (!item.cluster && item.items.length === 1 && item.items[0].items === undefined) {
          html += nodeRow(item.items[0], item.label);
          return;
        }
        html += '<details class="group' + (item.cluster ? " cluster" : "") + '" data-module="' + esc(item.key) + '">' +
          "<summary>" + esc(item.label) + (item.cls ? ' <span class="cls">' + esc(item.cls) + "</span>" : "") +
          ' <span class="count">' + item.stats.nodes + " nodes</span>" + groupBadges(item.stats) +
          "</summary>" + groupHtml(item) + "</details>";
      });
      return html;
    }
    var tree = document.getElementById("tree");
    tree.innerHTML = groupHtml(root);
    var rows = {};
    Array.prototype.forEach.call(tree.querySelectorAll(".node"), function (el) { rows[el.dataset.name] = el; });

    // ---- cluster map: one box per cluster, arcs where values cross clusters --------------------
    drawMap(data, root.items, groupBadges);

    // ---- selection and details -----------------------------------------------------------------
    var selected = null;
    function reveal(el) {
      for (var p = el.parentElement; p && p !== tree; p = p.parentElement) if (p.tagName === "DETAILS") p.open = true;
    }
    function select(name, scroll) {
      var n = byName[name], el = rows[name];
      if (!n || !el) return;
      if (selected) selected.classList.remove("selected");
      selected = el;
      el.classList.add("selected");
      reveal(el);
      if (scroll) el.scrollIntoView({ block: "center" });
      showDetails(n);
      highlightCluster(data.clusters[n.c].id);
      if (history.replaceState) history.replaceState(null, "", "#" + encodeURIComponent(name));
    }
    function link(name) {
      var n = byName[name];
      return '<a data-go="' + esc(name) + '">' + esc(name) + "</a>" +
        (n ? ' <span class="mono" style="color:#57606a">' + esc(n.v || "") + "</span>" +
             (n.d ? badge("b-" + n.d, n.d) : "") : "");
    }
    function row(label, value) { return "<tr><th>" + esc(label) + "</th><td>" + value + "</td></tr>"; }
    function showDetails(n) {
      var h = "<h2>" + esc(n.n) + (n.d ? badge("b-" + n.d, n.d) : "") + "</h2><table>";
      h += row("op", "<code>" + esc(n.o) + "</code>");
      h += row("target", "<code>" + esc(n.t || "") + "</code>");
      h += row("value", n.v ? "<code>" + esc(n.v) + "</code>" : '<span class="empty">unknown (no meta["val"])</span>');
      var m = n.m === undefined ? null : n.m;
      h += row("module", m === null ? '<span class="empty">none</span>' :
        "<code>" + esc(m || "(top level)") + "</code> " + esc(data.modules[m] || "") + (n.mi ? ' <span class="empty">(inferred)</span>' : ""));
      h += row("cluster", esc(data.clusters[n.c].label));
      if (n.s !== undefined) {
        var src = data.sources[n.s];
        h += row("source", "<code>" + esc(src[0]) + "</code>" + (src[1] ? "<br><code>" + esc(src[1]) + "</code>" : ""));
      } else {
        h += row("source", '<span class="empty">none recorded</span>');
      }
      if (n.a) h += row("args", "<code>" + esc(n.a) + "</code>");
      if (n.pa !== undefined) h += row("args before", "<code>" + esc(n.pa) + "</code>");
      if (n.pt !== undefined) h += row("target before", "<code>" + esc(n.pt) + "</code>");
      h += "</table>";
      var a = n.x && n.x.attention;
      if (a) {
        var local = [];
        for (var i = 0; i < a.kv_heads; i++) if (a.long_range.indexOf(i) < 0) local.push(i);
        h += "<h3>" + (n.k === "segment_attention" ? "segment_attention" : "attention site") + "</h3><table>";
        h += row("layer", a.layer + " (<code>" + esc(a.module) + "</code> " + esc(a["class"]) + ")");
        h += row("matched", esc(a.matched));
        h += row("heads", a.heads + " query heads, " + a.kv_heads + " KV heads, head_dim " + a.head_dim);
        h += row("long-range KV heads", esc(listText(a.long_range)));
        h += row("local KV heads", esc(listText(local)));
        h += row("scale", esc(a.scale));
        if (a.impl) h += row("impl", "<code>" + esc(a.impl) + "</code>");
        var c = data.config;
        if (c && c.segment_len !== undefined) {
          h += row("segment S", c.segment_len) + row("tail T", c.tail_len) + row("sinks G", c.sink_tokens);
          h += row("local head holds", "at most G + T + S = " + (c.sink_tokens + c.tail_len + c.segment_len) + " entries");
        }
        h += "</table>";
      }
      var st = n.x && n.x.state;
      if (st) {
        h += "<h3>carried state</h3><table>" + row("layer", st.layer) + row("name", "<code>" + esc(st.name) + "</code>") +
          row("role", st.direction === "in" ? "input of the segment-step graph (from the driver)" :
                                             "output of the segment-step graph (back to the driver)") + "</table>";
      }
      h += "<h3>inputs</h3>" + list(n.i);
      if (n.p) h += "<h3>inputs before the pass</h3>" + list(n.p);
      h += "<h3>users</h3>" + list(users[n.n]);
      document.getElementById("details").innerHTML = h;
    }
    function list(names) {
      if (!names || !names.length) return '<div class="empty">none</div>';
      return "<ul>" + names.map(function (x) { return "<li>" + link(x) + "</li>"; }).join("") + "</ul>";
    }
    tree.addEventListener("click", function (e) {
      var el = e.target.closest(".node");
      if (el) select(el.dataset.name, false);
    });
    document.getElementById("details").addEventListener("click", function (e) {
      var a = e.target.closest("a[data-go]");
      if (a) select(a.dataset.go, true);
    });

    // ---- search and filters --------------------------------------------------------------------
    var search = document.getElementById("search"), changedOnly = document.getElementById("changed-only");
    var countEl = document.getElementById("match-count"), timer = null;
    function applyFilter() {
      var q = search.value.trim().toLowerCase(), onlyChanged = changedOnly.checked, shown = 0, first = null;
      Object.keys(rows).forEach(function (name) {
        var el = rows[name], n = byName[name];
        var ok = (!onlyChanged || !!n.d) && (!q || name.toLowerCase().indexOf(q) >= 0);
        el.classList.toggle("hidden", !ok);
        if (ok) { shown++; if (!first) first = name; }
      });
      var groups = tree.querySelectorAll("details.group");
      for (var i = groups.length - 1; i >= 0; i--) {
        var g = groups[i], any = g.querySelector(".node:not(.hidden)") !== null;
        g.classList.toggle("hidden", !any);
        if ((q || onlyChanged) && any) g.open = true;
      }
      countEl.textContent = q || onlyChanged ? shown + " of " + nodes.length + " nodes" : nodes.length + " nodes";
      return first;
    }
    search.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(applyFilter, 120); });
    search.addEventListener("keydown", function (e) {
      if (e.key === "Enter") { var first = applyFilter(); if (first) select(first, true); }
    });
    changedOnly.addEventListener("change", applyFilter);
    document.getElementById("expand").addEventListener("click", function () {
      tree.querySelectorAll("details.group:not(.hidden)").forEach(function (d) { d.open = true; });
    });
    document.getElementById("collapse").addEventListener("click", function () {
      tree.querySelectorAll("details.group").forEach(function (d) { d.open = false; });
    });
    countEl.textContent = nodes.length + " nodes";

    // ---- map <-> tree ---------------------------------------------------------------------------
    function clusterEl(id) { return tree.querySelector('details.cluster[data-module="' + cssEscape(id) + '"]'); }
    function highlightCluster(id) {
      document.querySelectorAll("#map .box").forEach(function (b) { b.classList.toggle("current", b.dataset.cluster === id); });
      document.querySelectorAll("#map .arc").forEach(function (p) {
        p.classList.toggle("hot", p.dataset.from === id || p.dataset.to === id);
      });
    }
    document.getElementById("map").addEventListener("click", function (e) {
      var box = e.target.closest(".box");
      if (!box) return;
      var id = box.dataset.cluster, el = clusterEl(id);
      highlightCluster(id);
      if (el) { el.open = true; el.scrollIntoView({ block: "start" }); }
      else if (rows[box.dataset.first]) select(box.dataset.first, true);
    });

    // ---- initial view: the node in the address, else the first (segment_)attention or change ---
    var start = decodeURIComponent((location.hash || "").slice(1));
    if (!byName[start]) {
      var pick = function (f) { for (var i = 0; i < nodes.length; i++) if (f(nodes[i])) return nodes[i].n; return ""; };
      start = pick(function (n) { return n.k === "segment_attention"; }) ||
              pick(function (n) { return n.k === "attention"; }) || pick(function (n) { return !!n.d; });
    }
    if (start) select(start, true);
    else {
      var clusters = tree.querySelectorAll("details.cluster"), firstCluster = clusters[0];
      for (var i = 0; i < clusters.length; i++) {
        if (/\.\d+$/.test(clusters[i].dataset.module)) { firstCluster = clusters[i]; break; }  // the first layer
      }
      if (firstCluster) firstCluster.open = true;
      document.getElementById("details").innerHTML = '<p class="empty">Click a node to see its details.</p>';
    }
    // the pass links keep the selected node
    document.querySelectorAll("nav.passes a").forEach(function (a) {
      a.addEventListener("click", function () { if (selected) a.href = a.getAttribute("href").split("#")[0] + "#" + encodeURIComponent(selected.dataset.name); });
    });
  }

  function cssEscape(s) { return window.CSS && CSS.escape ? CSS.escape(s) : s.replace(/["\\]/g, "\\$&"); }

  function drawMap(data, groups, groupBadges) {
    var BOX_W = 178, BOX_H = 18, GAP = 5, LEFT = 2, ARC_X = LEFT + BOX_W;
    var index = {}, edges = {}, ids = [];
    groups.forEach(function (g, i) { index[g.key] = i; ids.push(g.key); });
    var clusterOf = {};
    data.nodes.forEach(function (n) { clusterOf[n.n] = data.clusters[n.c].id; });
    data.nodes.forEach(function (n) {
      if (n.d === "removed") return;
      (n.i || []).forEach(function (src) {
        var a = clusterOf[src], b = clusterOf[n.n];
        if (a !== undefined && a !== b) edges[a + "\u0000" + b] = [a, b];
      });
    });
    var maxSpan = 1;
    Object.keys(edges).forEach(function (k) { maxSpan = Math.max(maxSpan, Math.abs(index[edges[k][0]] - index[edges[k][1]])); });
    var width = ARC_X + 8 + Math.min(34, 6 + 3 * Math.sqrt(maxSpan) * 3), height = groups.length * (BOX_H + GAP);
    var svg = '<svg xmlns="http://www.w3.org/2000/svg" width="' + width + '" height="' + height + '">';
    Object.keys(edges).forEach(function (k) {
      var a = index[edges[k][0]], b = index[edges[k][1]];
      var y0 = a * (BOX_H + GAP) + BOX_H / 2, y1 = b * (BOX_H + GAP) + BOX_H / 2;
      var bend = ARC_X + 6 + Math.min(30, 3 * Math.sqrt(Math.abs(b - a)) * 3);
      svg += '<path class="arc" data-from="' + esc(edges[k][0]) + '" data-to="' + esc(edges[k][1]) + '" d="M' + ARC_X + " " + y0 +
        " C" + bend + " " + y0 + " " + bend + " " + y1 + " " + ARC_X + " " + y1 + '"/>';
    });
    groups.forEach(function (g, i) {
      var y = i * (BOX_H + GAP), s = g.stats, changed = s.added || s.removed || s.rewired || s.modified;
      var marks = "";
      if (changed) marks += ["added", "removed", "rewired", "modified"].filter(function (k) { return s[k]; })
        .map(function (k) { return STATUS_SIGN[k] + s[k]; }).join(" ");
      var short = g.short || g.label, label = short.length > 26 ? short.slice(0, 25) + "\u2026" : short;
      var first = g.items.length ? firstNode(g) : "";
      svg += '<g class="box' + (changed ? " changed" : "") + (s.attn ? " has-attn" : "") + '" data-cluster="' + esc(g.key) +
        '" data-first="' + esc(first) + '"><title>' + esc(g.label + " \u2014 " + s.nodes + " nodes" + (marks ? ", " + marks : "") +
        (s.attn ? ", attention" : "") + (s.state_in || s.state_out ? ", carried state " + (s.state_in || 0) + " in / " + (s.state_out || 0) + " out" : "")) +
        '</title><rect x="' + LEFT + '" y="' + y + '" width="' + BOX_W + '" height="' + BOX_H + '" rx="3"/>' +
        '<text x="' + (LEFT + 5) + '" y="' + (y + 13) + '">' + esc(label) + "</text>" +
        (marks ? '<text x="' + (LEFT + BOX_W - 4) + '" y="' + (y + 13) + '" text-anchor="end" style="fill:#bc4c00;font-weight:600">' + esc(marks) + "</text>" : "") +
        "</g>";
    });
    svg += "</svg>";
    document.getElementById("map").innerHTML = svg;
  }
  function firstNode(g) {
    for (var i = 0; i < g.items.length; i++) {
      var it = g.items[i];
      if (it.items === undefined) return it.n;
      var f = firstNode(it);
      if (f) return f;
    }
    return "";
  }

  try {
    var holder = document.getElementById("graph-data");
    if (holder) render(JSON.parse(holder.textContent));
    document.body.setAttribute("data-rendered", "1");
  } catch (e) {
    report("render failed: " + (e && e.stack ? e.stack : e));
  }
})();
"""
