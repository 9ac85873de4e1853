// The cluster page: asks /api/cluster about once a second and redraws. Everything that came
// from a node or from MQTT is put in the document as text (textContent, attributes), never as
// markup, so a hostile host cannot script the page.
"use strict";

(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let interval = 1000;

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    return node;
  }

  function shape(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  const num = (value, digits) => (value === null || value === undefined ? "–" : value.toFixed(digits));
  const slug = (state) => state.replace(/[^a-z]+/g, "-");

  function drawGraph(view) {
    const graph = $("graph");
    const count = view.nodes.length;
    const radius = count > 1 ? 115 : 0;
    const at = {};
    view.nodes.forEach((node, i) => {
      const angle = -Math.PI / 2 + (2 * Math.PI * i) / count;
      at[node.name] = [160 + radius * Math.cos(angle), 160 + radius * Math.sin(angle)];
    });
    const parts = view.links.map((link) => {
      const [x1, y1] = at[link.a];
      const [x2, y2] = at[link.b];
      const line = shape("line", { x1, y1, x2, y2, class: `link ${link.state}` });
      line.dataset.link = `${link.a}-${link.b}`;
      line.dataset.state = link.state;
      line.appendChild(shape("title", {}, `${link.a} – ${link.b}: ${link.state}`));
      return line;
    });
    for (const node of view.nodes) {
      const [x, y] = at[node.name];
      const leader = node.name === view.leader ? " leader" : "";
      const group = shape("g", { "data-node": node.name });
      group.appendChild(shape("circle", { cx: x, cy: y, r: 28, class: `node state-${slug(node.state)}${leader}` }));
      group.appendChild(shape("text", { x, y: y + 2, class: "label" }, node.name));
      group.appendChild(shape("text", { x, y: y + 15, class: "sublabel" }, node.role || node.state));
      group.appendChild(shape("title", {}, `${node.name}: ${node.state} (${node.detail})`));
      parts.push(group);
    }
    graph.replaceChildren(...parts);
  }

  function meter(value, max, extra) {
    const bar = el("meter", null, { min: 0, max: Math.max(max, 1e-9), value, ...extra });
    bar.title = `${value} of ${max}`;
    return bar;
  }

  function drawNodes(view) {
    const highest = Math.max(0, ...view.nodes.map((n) => n.commit || 0));
    const rows = view.nodes.map((node) => {
      const row = el("tr", null, { "data-node": node.name, "data-state": node.state });
      if (node.role) row.dataset.role = node.role;
      const state = el("td", node.state, { title: node.detail });
      if (node.state === "down" || node.state === "error") {
        state.appendChild(el("span", ` (${node.detail})`, { class: "muted" }));
      }
      const cells = [
        el("td", node.name),
        state,
        el("td", node.role || "–"),
        el("td", node.leader || "–"),
        el("td", node.term ?? "–", { class: "num" }),
      ];
      const progress = el("td", node.commit === null ? "–" : `${node.commit} / ${node.applied} `);
      if (node.applied !== null) progress.appendChild(meter(node.applied, highest));
      cells.push(progress);
      const peers = node.state === "down" || node.state === "error" ? "–" : node.peers.join(", ") || "none";
      cells.push(el("td", peers));
      cells.push(el("td", node.service_up === null ? "–" : node.service_up ? "up" : "down"));
      cells.push(el("td", num(node.release_rate, 1), { class: "num" }));
      cells.push(el("td", num(node.release_latency_ms, 1), { class: "num" }));
      cells.push(el("td", num(node.attestation_failure_rate, 2), { class: "num" }));
      const ring = el("td", node.ring_fill === null ? "–" : `${(node.ring_fill * 100).toFixed(1)}% `);
      if (node.ring_fill !== null) ring.appendChild(meter(node.ring_fill, 1, { low: 0.5, high: 0.8, optimum: 0 }));
      cells.push(ring);
      row.replaceChildren(...cells);
      return row;
    });
    $("nodes").tBodies[0].replaceChildren(...rows);
  }

  function drawAudit(audit) {
    const mqtt = $("mqtt");
    mqtt.textContent = audit.connected
      ? `from the MQTT broker at ${audit.broker} (the newest first; records published before the page started are not shown)`
      : `MQTT not reachable: ${audit.error}`;
    mqtt.className = audit.connected ? "muted" : "problem";
    mqtt.dataset.connected = String(audit.connected);
    const items = audit.records.map((record) =>
      el("li", `${record.time}  ${record.node}  ${record.summary}`, { class: record.status || "" }),
    );
    if (!items.length) items.push(el("li", "no audit record yet", { class: "muted" }));
    $("audit").replaceChildren(...items);
  }

  function draw(page) {
    const view = page.view;
    interval = Math.max(250, page.interval * 1000);
    $("cluster").textContent = view.cluster;
    $("leader").textContent = view.leader || "none";
    $("leader").dataset.leader = view.leader || "";
    $("term").textContent = view.term ?? "–";
    $("release-rate").textContent = num(view.release_rate, 1);
    $("attest-rate").textContent = num(view.attestation_failure_rate, 2);
    $("updated").textContent = new Date().toLocaleTimeString();
    drawGraph(view);
    drawNodes(view);
    drawAudit(page.audit);
  }

  async function tick() {
    const problem = $("problem");
    try {
      const answer = await fetch("/api/cluster", { cache: "no-store" });
      if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
      draw(await answer.json());
      problem.hidden = true;
    } catch (error) {
      problem.textContent = `the dashboard server does not answer (${error.message}): is kmctl dashboard running?`;
      problem.hidden = false;
    } finally {
      setTimeout(tick, interval);
    }
  }

  tick();
})();
