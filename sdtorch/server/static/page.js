// sdtorch's page: a plain client of the A1111 API this server speaks (/sdapi/v1); no framework, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
const API = "sdapi/v1/";
let mode = "txt2img", lastSeed = -1, maskPainted = false;

async function api(path, body) {
  const init = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(API + path, init);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && data.detail;
    const text = Array.isArray(detail) ? detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("\n")
      : (detail || response.statusText);
    throw new Error(`${response.status}: ${text}`);
  }
  return data;
}

function fillSelect(select, items, value) {
  select.replaceChildren(...items.map(([v, label]) => new Option(label, v)));
  if (value !== undefined) select.value = value;
}

async function loadLists() {
  const [samplers, schedulers, models, options] = await Promise.all(
    [api("samplers"), api("schedulers"), api("sd-models"), api("options")]);
  fillSelect($("sampler"), samplers.map((s) => [s.name, s.name]), "Euler a");
  fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
  fillSelect($("model"), models.map((m) => [m.title, m.model_name]), options.sd_model_checkpoint);
  setSize(options.sdtorch_model_resolution);
}

function setSize(resolution) {
  if (resolution) { $("width").value = resolution; $("height").value = resolution; }
}

// -- img2img / inpaint: the image and the mask painted over it -------------------------------------------------------
function showTab(name) {
  mode = name;
  $("tab-txt2img").classList.toggle("active", name === "txt2img");
  $("tab-img2img").classList.toggle("active", name === "img2img");
  $("img2img-panel").classList.toggle("hidden", name !== "img2img");
}

function loadInit(file) {
  const image = new Image();
  image.onload = () => {
    for (const canvas of [$("init-canvas"), $("mask")]) { canvas.width = image.width; canvas.height = image.height; }
    $("init-canvas").getContext("2d").drawImage(image, 0, 0);
    clearMask();
    $("width").value = Math.floor(image.width / 8) * 8;
    $("height").value = Math.floor(image.height / 8) * 8;
  };
  image.src = URL.createObjectURL(file);
}

function clearMask() {
  $("mask").getContext("2d").clearRect(0, 0, $("mask").width, $("mask").height);
  maskPainted = false;
}

function paint(event) {
  if (!(event.buttons & 1)) return;
  const canvas = $("mask"), box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width;
  const y = (event.clientY - box.top) * canvas.height / box.height;
  const r = Number($("brush").value) * canvas.width / box.width / 2;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.beginPath();
  ctx.arc(x, y, r, 0, 2 * Math.PI);
  ctx.fill();
  maskPainted = true;
}

function maskPng() {  // white = repaint, on black
  const out = document.createElement("canvas");
  out.width = $("mask").width; out.height = $("mask").height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage($("mask"), 0, 0);
  return out.toDataURL("image/png");
}

// -- generate ------------------------------------------------------------------------------------------------------
function payload() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    scheduler: $("scheduler").value, steps: Number($("steps").value), cfg_scale: Number($("cfg").value),
    seed: Number($("seed").value), width: Number($("width").value), height: Number($("height").value),
    batch_size: Number($("batch").value),
  };
  if (mode === "img2img") {
    if (!$("init-canvas").width) throw new Error("choose an image first");
    body.init_images = [$("init-canvas").toDataURL("image/png")];
    body.denoising_strength = Number($("strength").value);
    if (maskPainted) { body.mask = maskPng(); body.inpainting_fill = Number($("fill").value); }
  }
  return body;
}

async function pollProgress(state) {
  while (state.running) {
    try {
      const p = await api("progress");
      if (state.running && p.state.job_count) {
        $("progress").value = p.progress;
        if (p.current_image) $("preview").src = "data:image/png;base64," + p.current_image;
      }
    } catch (e) { /* the next poll will tell */ }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

async function generate() {
  $("error").textContent = "";
  let body;
  try { body = payload(); } catch (e) { $("error").textContent = e.message; return; }
  $("generate").disabled = true;
  const state = {running: true};
  pollProgress(state);
  try {
    const r = await api(mode === "img2img" ? "img2img" : "txt2img", body);
    const info = JSON.parse(r.info);
    lastSeed = info.seed;
    for (let k = r.images.length - 1; k >= 0; k--) addResult(r.images[k], info.infotexts[k], info.all_seeds[k]);
    $("progress").value = 1;
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    state.running = false;
    $("generate").disabled = false;
  }
}

function addResult(b64, text, seed) {
  const card = document.createElement("div");
  card.className = "result";
  const img = new Image();
  img.src = "data:image/png;base64," + b64;
  img.alt = text;
  const pre = document.createElement("pre");
  pre.textContent = text;
  const link = document.createElement("a");
  link.href = img.src;
  link.download = `${seed}.png`;
  link.textContent = "download";
  card.append(img, pre, link);
  $("gallery").prepend(card);
}

// -- a dropped PNG fills the form from its parameters (A1111's "PNG Info") ------------------------------------------
async function fillFromPng(file) {
  const dataUrl = await new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.readAsDataURL(file);
  });
  const {parameters: p} = await api("png-info", {image: dataUrl});
  if (!p || p.Prompt === undefined) throw new Error("this image carries no generation parameters");
  const set = (id, value) => { if (value !== undefined) $(id).value = value; };
  set("prompt", p.Prompt);
  set("negative", p["Negative prompt"]);
  set("steps", p.Steps);
  set("cfg", p["CFG scale"]);
  set("seed", p.Seed);
  set("width", p["Size-1"]);
  set("height", p["Size-2"]);
  if (p.Sampler) set("sampler", p.Sampler);
  set("scheduler", p["Schedule type"] ? p["Schedule type"].toLowerCase().replace(" ", "_") : "automatic");
}

function wire() {
  $("tab-txt2img").onclick = () => showTab("txt2img");
  $("tab-img2img").onclick = () => showTab("img2img");
  $("seed-random").onclick = () => { $("seed").value = -1; };
  $("seed-reuse").onclick = () => { if (lastSeed !== -1) $("seed").value = lastSeed; };
  $("init").onchange = (e) => { if (e.target.files[0]) loadInit(e.target.files[0]); };
  $("clear-mask").onclick = clearMask;
  $("mask").addEventListener("pointerdown", paint);
  $("mask").addEventListener("pointermove", paint);
  $("generate").onclick = generate;
  $("model").onchange = async () => {
    $("status").textContent = "loading…";
    try {
      await api("options", {sd_model_checkpoint: $("model").value});
      setSize((await api("options")).sdtorch_model_resolution);
      $("status").textContent = "";
    } catch (e) { $("status").textContent = e.message; }
  };
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", async (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    const file = e.dataTransfer.files[0];
    if (!file) return;
    try { await fillFromPng(file); } catch (err) { $("error").textContent = err.message; }
  });
}

wire();
loadLists().catch((e) => { $("error").textContent = e.message; });
