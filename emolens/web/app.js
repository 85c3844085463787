"use strict";
// The emolens page: everything it needs comes from this server.
const $ = (id) => document.getElementById(id);
let classes = [], polarity = [], heatmaps = false;
const NEAR = 0.25;  // a click on the plane searches this far around the point on both axes

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

// The valence-arousal plane (common scale, -1 to 1 on both axes) as an SVG; points are [valence, arousal]:
// the image's own (large), and the collection's (small dots). Made from markup: the HTML parser puts <svg>
// in its namespace.
function plane(points, onPick, dots = []) {
  const size = 180, pad = 16, span = size - 2 * pad, mid = size / 2;
  const at = (v) => (pad + (v + 1) / 2 * span).toFixed(1);
  const holder = document.createElement("div");
  holder.innerHTML = `<svg viewBox="0 0 ${size} ${size}" class="plane" role="img">
    <rect x="${pad}" y="${pad}" width="${span}" height="${span}" class="frame"></rect>
    <line x1="${pad}" y1="${mid}" x2="${size - pad}" y2="${mid}" class="axis"></line>
    <line x1="${mid}" y1="${pad}" x2="${mid}" y2="${size - pad}" class="axis"></line>
    <text x="${size - pad}" y="${mid - 3}" text-anchor="end">pleasant</text><text x="${pad}" y="${mid - 3}">unpleasant</text>
    <text x="${mid + 3}" y="${pad + 10}">excited</text><text x="${mid + 3}" y="${size - pad - 3}">calm</text>
    ${dots.map(([v, a]) => `<circle cx="${at(v)}" cy="${(size - at(a)).toFixed(1)}" r="1.6" class="dot"></circle>`).join("")}
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
      const valence = clamp((x - pad) / span * 2 - 1), arousal = clamp((size - y - pad) / span * 2 - 1);
      let marker = svg.querySelector(".marker");  // where one clicked, and the square searched around it
      if (!marker) {
        svg.insertAdjacentHTML("beforeend", `<rect class="near"></rect><circle r="4" class="marker"></circle>`);
        marker = svg.querySelector(".marker");
      }
      marker.setAttribute("cx", at(valence));
      marker.setAttribute("cy", (size - at(arousal)).toFixed(1));
      const near = svg.querySelector(".near"), side = NEAR / 2 * span;  // NEAR on the [-1, 1] scale
      const inFrame = (v) => Math.max(pad, Math.min(size - pad, v));
      const [x0, x1] = [inFrame(+at(valence) - side), inFrame(+at(valence) + side)];
      const [y0, y1] = [inFrame(size - at(arousal) - side), inFrame(size - at(arousal) + side)];
      near.setAttribute("x", x0.toFixed(1));
      near.setAttribute("y", y0.toFixed(1));
      near.setAttribute("width", (x1 - x0).toFixed(1));
      near.setAttribute("height", (y1 - y0).toFixed(1));
      onPick(valence, arousal);
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

// emotion: the emotion searched for, whose probability each caption leads with (the top one follows where
// it is another).
function showGrid(title, hits, emotion) {
  $("grid-title").hidden = false;
  $("grid-title").textContent = title;
  const grid = $("grid");
  grid.innerHTML = "";
  for (const h of hits) {
    const fig = document.createElement("figure");
    fig.tabIndex = 0;
    fig.setAttribute("role", "button");
    fig.innerHTML = `<img alt=""><figcaption><span class="name"></span><span class="top"></span></figcaption>`;
    fig.querySelector("img").src = h.url;
    fig.querySelector("img").alt = h.name;
    fig.querySelector(".name").textContent = h.name;
    const top = `${h.emotion} ${h.probability.toFixed(2)}`;
    fig.querySelector(".top").textContent = (!emotion || emotion === h.emotion ? top
      : `${emotion} ${h.distribution[emotion].toFixed(2)} (top: ${top})`) + affectText(h);
    fig.onclick = () => openViewer(h);
    fig.onkeydown = (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); openViewer(h); } };
    grid.appendChild(fig);
  }
  $("search").scrollIntoView({ behavior: "smooth" });
}

// An indexed image, large, with its full analysis: the distribution, polarity, valence and arousal.
function openViewer(h) {
  const body = $("viewer-body");
  body.innerHTML = `<img alt=""><div><h3></h3><p class="meta"></p></div>`;
  body.querySelector("img").src = h.url;
  body.querySelector("img").alt = h.name;
  body.querySelector("h3").textContent = `${h.emotion} (${(100 * h.probability).toFixed(0)}%)`;
  body.querySelector(".meta").textContent = `${h.name}: ${h.polarity || "no polarity"}${affectText(h)}`;
  const readings = document.createElement("div");
  readings.className = "readings";
  readings.appendChild(bars(h.distribution));
  if (h.valence !== null && h.valence !== undefined) readings.appendChild(plane([[h.valence, h.arousal]]));
  body.children[1].appendChild(readings);
  $("viewer").showModal();
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
      const body = await api(`/api/predict${heatmaps ? "?heatmaps=true" : ""}`, { method: "POST", body: form });
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
    } catch (err) {  // the server's words, as the CLI's: "NAME: reason"
      card.innerHTML = `<p class="error"></p>`;
      const reason = err.message.startsWith(`${file.name}: `) ? err.message.slice(file.name.length + 2) : err.message;
      card.querySelector(".error").textContent = `${file.name}: ${reason}`;
    }
  }
  $("status").textContent = "";
}

async function start() {
  const model = await api("/api/models");
  classes = model.classes;
  polarity = model.polarity;
  heatmaps = model.heatmaps;
  const health = await api("/api/health");
  if (health.index !== null) {
    $("search").hidden = false;
    for (const name of classes) {
      const chip = document.createElement("button");
      chip.className = `chip ${polarityClass(name)}`;
      chip.textContent = name;
      chip.onclick = async () => showGrid(`Most ${name}`, (await api(`/api/search?emotion=${encodeURIComponent(name)}&k=24`)).hits, name);
      $("chips").appendChild(chip);
    }
    if (model.affect) {
      $("feel").hidden = false;
      const collection = await api("/api/points");
      $("feel").appendChild(plane([], async (valence, arousal) => {
        const range = (v) => `${Math.max(-1, v - NEAR).toFixed(2)}:${Math.min(1, v + NEAR).toFixed(2)}`;
        const found = await api(`/api/search?valence=${range(valence)}&arousal=${range(arousal)}&k=24&nearest=true`);
        const where = `valence ${valence.toFixed(2)}, arousal ${arousal.toFixed(2)}`;
        showGrid(found.outside ? `No image lies within ${NEAR} of ${where}; the nearest ones:` : `Feeling near ${where}`,
                 found.hits);
      }, collection.points));
      $("feel-note").textContent = `Dots: where the collection's ${collection.total} images lie.`;
    }
  }
  const drop = $("drop");
  $("picker").onchange = (e) => {
    analyse([...e.target.files]);
    e.target.value = "";  // the same file can be picked again
  };
  $("viewer-close").onclick = () => $("viewer").close();
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); analyse([...e.dataTransfer.files]); });
}

start().catch((err) => { $("status").textContent = `The server did not answer: ${err.message}`; });
