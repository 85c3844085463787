"use strict";
// The emolens page: everything it needs comes from this server.
const $ = (id) => document.getElementById(id);
let classes = [], polarity = [];

function polarityClass(name) {
  const p = polarity[classes.indexOf(name)];
  return p === 1 ? "positive" : p === 0 ? "negative" : "none";
}

function bars(distribution) {
  const box = document.createElement("div");
  box.className = "bars";
  for (const name of classes) {
    const p = distribution[name] || 0;
    const row = document.createElement("div");
    row.className = "bar";
    row.innerHTML = `<span></span><span class="track"><span class="fill ${polarityClass(name)}"></span></span><span></span>`;
    row.children[0].textContent = name;
    row.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    row.children[2].textContent = p.toFixed(2);
    box.appendChild(row);
  }
  return box;
}

// The valence-arousal plane (common scale, -1 to 1 on both axes) as an SVG; points are [valence, arousal].
// Made from markup: the HTML parser puts <svg> in its namespace.
function plane(points, onPick) {
  const size = 180, pad = 16, span = size - 2 * pad, mid = size / 2;
  const at = (v) => (pad + (v + 1) / 2 * span).toFixed(1);
  const holder = document.createElement("div");
  holder.innerHTML = `<svg viewBox="0 0 ${size} ${size}" class="plane" role="img">
    <rect x="${pad}" y="${pad}" width="${span}" height="${span}" class="frame"></rect>
    <line x1="${pad}" y1="${mid}" x2="${size - pad}" y2="${mid}" class="axis"></line>
    <line x1="${mid}" y1="${pad}" x2="${mid}" y2="${size - pad}" class="axis"></line>
    <text x="${size - pad}" y="${mid - 3}" text-anchor="end">pleasant</text><text x="${pad}" y="${mid - 3}">unpleasant</text>
    <text x="${mid + 3}" y="${pad + 10}">excited</text><text x="${mid + 3}" y="${size - pad - 3}">calm</text>
    ${points.map(([v, a]) => `<circle cx="${at(v)}" cy="${(size - at(a)).toFixed(1)}" r="5" class="point"></circle>`).join("")}
  </svg>`;
  const svg = holder.firstElementChild;
  const labels = points.map(([v, a]) => `valence ${v.toFixed(2)}, arousal ${a.toFixed(2)}`);
  svg.setAttribute("aria-label", `valence-arousal plane${labels.length ? ": " + labels.join("; ") : ""}`);
  if (onPick) {
    svg.classList.add("pick");
    svg.addEventListener("click", (e) => {
      const box = svg.getBoundingClientRect();
      const clamp = (v) => Math.max(-1, Math.min(1, v));
      const x = (e.clientX - box.left) / box.width * size, y = (e.clientY - box.top) / box.height * size;
      onPick(clamp((x - pad) / span * 2 - 1), clamp((size - y - pad) / span * 2 - 1));
    });
  }
  return svg;
}

function affectText(r) {
  return r.valence === null || r.valence === undefined ? "" :
    ` · valence ${r.valence.toFixed(2)}, arousal ${r.arousal.toFixed(2)}`;
}

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function showGrid(title, hits) {
  $("grid-title").hidden = false;
  $("grid-title").textContent = title;
  const grid = $("grid");
  grid.innerHTML = "";
  for (const h of hits) {
    const fig = document.createElement("figure");
    fig.innerHTML = `<img alt=""><figcaption></figcaption>`;
    fig.querySelector("img").src = h.url;
    fig.querySelector("img").alt = h.name;
    fig.querySelector("figcaption").textContent = `${h.emotion} ${h.probability.toFixed(2)}${affectText(h)}`;
    grid.appendChild(fig);
  }
  $("search").scrollIntoView({ behavior: "smooth" });
}

async function analyse(files) {
  $("status").textContent = `Analysing ${files.length} image(s)…`;
  for (const file of files) {
    const form = new FormData();
    form.append("files", file);
    const card = document.createElement("article");
    card.className = "card";
    $("results").prepend(card);
    try {
      const body = await api("/api/predict?heatmaps=true", { method: "POST", body: form }).catch(async () => {
        const again = new FormData();
        again.append("files", file);
        return api("/api/predict", { method: "POST", body: again });  // servers without heat maps
      });
      const r = body.results[0];
      const original = URL.createObjectURL(file);
      card.innerHTML = `<div><img alt=""></div><div><h3></h3><p class="meta"></p></div>`;
      const img = card.querySelector("img");
      img.src = original;
      img.alt = file.name;
      card.querySelector("h3").textContent = `${r.emotion} (${(100 * r.probability).toFixed(0)}%)`;
      card.querySelector(".meta").textContent = `${file.name}: ${r.polarity || "no polarity"}${affectText(r)}`;
      const info = card.children[1];
      const readings = document.createElement("div");
      readings.className = "readings";
      readings.appendChild(bars(r.distribution));
      if (r.valence !== null && r.valence !== undefined) readings.appendChild(plane([[r.valence, r.arousal]]));
      info.appendChild(readings);
      if (r.heatmap) {
        const toggle = document.createElement("button");
        toggle.textContent = "Show where it comes from";
        toggle.className = "overlay-toggle";
        toggle.onclick = () => {
          const on = img.src !== r.heatmap;
          img.src = on ? r.heatmap : original;
          toggle.textContent = on ? "Show the photo" : "Show where it comes from";
        };
        info.appendChild(toggle);
      }
      if (!$("search").hidden) {
        const like = document.createElement("button");
        like.textContent = "Find images that feel like this";
        like.onclick = async () => {
          const q = new FormData();
          q.append("file", file);
          const found = await api("/api/search?k=12", { method: "POST", body: q });
          showGrid(`Feels like ${file.name}`, found.hits);
        };
        info.appendChild(like);
      }
    } catch (err) {
      card.innerHTML = `<p class="error"></p>`;
      card.querySelector(".error").textContent = `${file.name}: ${err.message}`;
    }
  }
  $("status").textContent = "";
}

async function start() {
  const model = await api("/api/models");
  classes = model.classes;
  polarity = model.polarity;
  const health = await api("/api/health");
  if (health.index !== null) {
    $("search").hidden = false;
    for (const name of classes) {
      const chip = document.createElement("button");
      chip.className = `chip ${polarityClass(name)}`;
      chip.textContent = name;
      chip.onclick = async () => showGrid(`Most ${name}`, (await api(`/api/search?emotion=${encodeURIComponent(name)}&k=24`)).hits);
      $("chips").appendChild(chip);
    }
    if (model.affect) {
      $("feel").hidden = false;
      $("feel").appendChild(plane([], async (valence, arousal) => {
        const range = (v) => `${Math.max(-1, v - 0.25).toFixed(2)}:${Math.min(1, v + 0.25).toFixed(2)}`;
        const url = `/api/search?valence=${range(valence)}&arousal=${range(arousal)}&k=24`;
        showGrid(`Feeling near valence ${valence.toFixed(2)}, arousal ${arousal.toFixed(2)}`, (await api(url)).hits);
      }));
    }
  }
  const drop = $("drop");
  $("picker").onchange = (e) => analyse([...e.target.files]);
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); analyse([...e.dataTransfer.files]); });
}

start().catch((err) => { $("status").textContent = `The server did not answer: ${err.message}`; });
