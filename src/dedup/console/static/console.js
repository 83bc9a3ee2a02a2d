// The console's only script (the CSP allows no other): draws the Links graph and follows a
// cluster sweep. Pages work without it, except the graph and the live progress.
"use strict";

function drawGraph() {
  const container = document.getElementById("graph");
  const data = document.getElementById("graph-data");
  if (!container || !data || typeof cytoscape !== "function") {
    return;
  }
  const graph = JSON.parse(data.textContent);
  const cy = cytoscape({
    container: container,
    elements: graph.nodes.concat(graph.edges),
    layout: { name: "concentric", concentric: (node) => node.data("asked") ? 2 : 1,
              levelWidth: () => 1, minNodeSpacing: 40, animate: false },
    style: [
      { selector: "node", style: {
        "label": "data(label)", "text-wrap": "wrap", "text-valign": "center",
        "text-halign": "right", "text-margin-x": 6, "font-size": 11,
        "background-color": "#4f7cac", "width": 26, "height": 26, "color": "#1d2733" } },
      { selector: "node[asked = 1]", style: { "background-color": "#c0392b", "width": 34,
                                              "height": 34 } },
      { selector: "edge", style: {
        "label": "data(label)", "font-size": 10, "width": "mapData(score, 0.3, 1, 1, 7)",
        "line-color": "#8aa1b8", "curve-style": "straight", "text-background-color": "#fff",
        "text-background-opacity": 1, "text-background-padding": 2 } },
    ],
    minZoom: 0.2,
    maxZoom: 3,
  });
  // A few nodes would be fitted at a zoom that makes their labels huge.
  if (cy.zoom() > 1.3) {
    cy.zoom(1.3);
    cy.center();
  }
  cy.on("tap", "node", (event) => {
    const id = event.target.id();
    if (!event.target.data("asked")) {
      window.location.assign("/links?id_number=" + encodeURIComponent(id));
    }
  });
  window.dedupGraph = cy;  // for the browser tests
}

function clusterItem(cluster) {
  const item = document.createElement("li");
  item.className = "cluster";
  const ids = document.createElement("span");
  ids.className = "ids";
  cluster.id_numbers.forEach((id, index) => {
    const link = document.createElement("a");
    link.href = "/links?id_number=" + encodeURIComponent(id);
    link.textContent = id;
    if (index > 0) {
      ids.append(", ");
    }
    ids.append(link);
  });
  const hint = document.createElement("span");
  hint.className = "hint";
  hint.textContent = " weakest link " + cluster.min_link_score.toFixed(4) +
    (cluster.truncated_by.length ? "; cut off by " + cluster.truncated_by.join(", ") : "");
  const members = document.createElement("ul");
  cluster.registrations.forEach((r) => {
    const member = document.createElement("li");
    const link = document.createElement("a");
    link.href = "/registrations/" + encodeURIComponent(r.registration_id);
    link.textContent = r.registration_id;
    member.append(link, " (" + r.id_number + ")");
    members.append(member);
  });
  item.append(ids, " ", hint, members);
  return item;
}

function showState(job, state) {
  const progress = document.getElementById("cluster-progress");
  progress.max = Math.max(state.total, 1);
  progress.value = state.searched;
  document.getElementById("searched").textContent = state.searched;
  document.getElementById("total").textContent = state.total;
  document.getElementById("found").textContent = state.found;
  const list = document.getElementById("cluster-list");
  state.clusters.forEach((cluster) => list.append(clusterItem(cluster)));
  job.dataset.found = state.found;
  if (state.done) {
    job.className = "done";
    const status = document.getElementById("cluster-status");
    status.firstChild.textContent = state.error ? "Ended: " + state.error + ": " : "Done: ";
    document.getElementById("partial-note").textContent = "";
    document.getElementById("cancel-form").className = "hidden";
  }
}

function followSweep() {
  const job = document.getElementById("cluster-job");
  if (!job || job.className === "done") {
    return;
  }
  const poll = () => {
    fetch(job.dataset.state + "?after=" + job.dataset.found, { credentials: "same-origin" })
      .then((response) => {
        if (response.status === 401 || response.status === 404) {
          document.getElementById("cluster-status").textContent =
            "Your session has ended, and with it this sweep: sign in again.";
          return new Promise(() => {});  // stop polling
        }
        return response.ok ? response.json() : Promise.reject(response.status);
      })
      .then((state) => {
        showState(job, state);
        if (!state.done) {
          window.setTimeout(poll, 400);
        }
      })
      .catch(() => window.setTimeout(poll, 2000));
  };
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  drawGraph();
  followSweep();
});
