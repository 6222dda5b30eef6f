/* The trajectory viewer: filters (run, step, failure kind, reward range) kept in location.hash,
   one card per trajectory built with DOM calls (text is never parsed as HTML). */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("trajectory-data").textContent);
  var kinds = JSON.parse(document.getElementById("failure-kinds").textContent);
  var root = document.getElementById("viewer");
  var count = document.getElementById("viewer-count");
  var controls = {
    run: document.getElementById("f-run"), step: document.getElementById("f-step"),
    kind: document.getElementById("f-kind"), min: document.getElementById("f-min"),
    max: document.getElementById("f-max")
  };
  var SHOWN_AT_ONCE = 300;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function addOption(select, value, text) {
    var o = el("option", null, text);
    o.value = value;
    select.appendChild(o);
  }
  function unique(values) {
    var seen = {}, out = [];
    values.forEach(function (v) { var k = String(v); if (!seen[k]) { seen[k] = true; out.push(v); } });
    return out;
  }

  unique(data.map(function (t) { return t.run; })).forEach(function (r) { addOption(controls.run, r, r); });
  unique(data.map(function (t) { return t.step; })).sort(function (a, b) { return a - b; })
    .forEach(function (s) { addOption(controls.step, String(s), String(s)); });
  Object.keys(kinds).forEach(function (k) { addOption(controls.kind, k, k.replace("_", " ") + ": " + kinds[k]); });
  if (controls.run.options.length <= 2) { controls.run.parentNode.style.display = "none"; }

  function readHash() {
    var params = new URLSearchParams(window.location.hash.slice(1));
    Object.keys(controls).forEach(function (name) { controls[name].value = params.get(name) || ""; });
  }
  function writeHash() {
    var params = new URLSearchParams();
    Object.keys(controls).forEach(function (name) {
      if (controls[name].value !== "") { params.set(name, controls[name].value); }
    });
    history.replaceState(null, "", "#" + params.toString());
  }

  function matches(t) {
    if (controls.run.value && t.run !== controls.run.value) { return false; }
    if (controls.step.value && String(t.step) !== controls.step.value) { return false; }
    var kind = controls.kind.value;
    if (kind === "any" && t.failures.length === 0) { return false; }
    if (kind === "none" && t.failures.length > 0) { return false; }
    if (kind && kind !== "any" && kind !== "none" && t.failures.indexOf(kind) < 0) { return false; }
    if (controls.min.value !== "" && !(t.reward !== null && t.reward >= Number(controls.min.value))) { return false; }
    if (controls.max.value !== "" && !(t.reward !== null && t.reward <= Number(controls.max.value))) { return false; }
    return true;
  }

  function fmt(x) { return typeof x === "number" ? x.toFixed(3) : String(x); }

  function card(t) {
    var box = el("div", "traj" + (t.failures.length ? " failed" : ""));
    box.setAttribute("data-id", t.id);
    box.setAttribute("data-failures", t.failures.join(" "));
    var head = el("div", "traj-head");
    head.appendChild(el("b", null, t.run + " · step " + t.step));
    head.appendChild(el("span", null, "reward " + (t.reward === null ? "n/a" : fmt(t.reward))));
    Object.keys(t.components).forEach(function (c) { head.appendChild(el("span", "badge", c + " " + fmt(t.components[c]))); });
    head.appendChild(el("span", "badge", "finish: " + (t.finish || "?")));
    if (t.turns !== null && t.turns !== undefined) { head.appendChild(el("span", "sub", t.turns + " turn(s), " + (t.tool_calls || 0) + " tool call(s)")); }
    t.failures.forEach(function (f) { head.appendChild(el("span", "badge fail", f.replace("_", " "))); });
    box.appendChild(head);

    var prompt = el("details");
    prompt.appendChild(el("summary", null, "prompt"));
    prompt.appendChild(el("pre", null, t.prompt));
    box.appendChild(prompt);

    var tokens = el("div", "tokens");
    t.segments.forEach(function (s) {
      var cls = s.trained === true ? "trained" : (s.trained === false ? "masked" : "unknown");
      var span = el("span", "seg " + cls, s.text);
      if (s.tokens !== undefined) { span.title = s.tokens + " token(s), " + (s.trained ? "trained on" : "masked"); }
      tokens.appendChild(span);
    });
    box.appendChild(tokens);

    if (t.events.length) {
      var turns = el("details");
      turns.appendChild(el("summary", null, "turns and tool calls (" + t.events.length + ")"));
      t.events.forEach(function (e) {
        var item = el("div", "event");
        if (e.role === "tool") {
          item.appendChild(el("span", "role", "tool " + (e.name || "")));
          item.appendChild(el("span", "badge " + (e.ok ? "ok" : "fail"), e.ok ? "ok" : "failed"));
        } else {
          item.appendChild(el("span", "role", e.role || "assistant"));
          (e.calls || []).forEach(function (c) { item.appendChild(el("span", "badge", "call " + (c.name || "?"))); });
          (e.parse_errors || []).forEach(function (p) { item.appendChild(el("span", "badge fail", "parse error: " + p)); });
        }
        item.appendChild(el("pre", null, e.text));
        turns.appendChild(item);
      });
      box.appendChild(turns);
    }
    if (t.errors.length) { box.appendChild(el("pre", "badge fail", "reward errors: " + t.errors.join("; "))); }
    return box;
  }

  function render() {
    var shown = data.filter(matches);
    root.textContent = "";
    shown.slice(0, SHOWN_AT_ONCE).forEach(function (t) { root.appendChild(card(t)); });
    var text = "showing " + shown.length + " of " + data.length + " trajectories";
    if (shown.length > SHOWN_AT_ONCE) { text += " (the first " + SHOWN_AT_ONCE + " drawn: narrow the filters)"; }
    count.textContent = text;
    count.setAttribute("data-shown", String(shown.length));
    document.documentElement.setAttribute("data-viewer-cards", String(root.children.length));
  }

  Object.keys(controls).forEach(function (name) {
    controls[name].addEventListener("change", function () { writeHash(); render(); });
  });
  window.addEventListener("hashchange", function () { readHash(); render(); });
  readHash();
  render();
})();
