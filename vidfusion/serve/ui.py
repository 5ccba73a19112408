"""The web UI: one self-contained page that uses the same /v1 API (and so the same queue) as scripts do."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vidfusion</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f6; color: #222; }
  header { background: #1d1f2b; color: #fff; padding: .8rem 1.5rem; display: flex; gap: 1rem; align-items: baseline; }
  header small { opacity: .7; }
  main { display: grid; grid-template-columns: minmax(300px, 420px) 1fr; gap: 1.5rem; padding: 1.5rem; }
  section { background: #fff; border-radius: 8px; padding: 1rem 1.2rem; box-shadow: 0 1px 3px rgba(0,0,0,.08); }
  label { display: block; font-size: .85rem; margin-top: .6rem; color: #555; }
  fieldset { margin-top: .8rem; border: 1px solid #ddd; border-radius: 6px; }
  fieldset .lora { display: grid; grid-template-columns: auto 1fr 5rem; gap: .4rem; align-items: center; }
  fieldset .lora input[type=checkbox] { width: auto; }
  input, textarea, select { width: 100%; box-sizing: border-box; padding: .4rem; font: inherit; }
  textarea { min-height: 4.5rem; }
  .row { display: grid; grid-template-columns: 1fr 1fr; gap: .6rem; }
  button { margin-top: 1rem; padding: .6rem 1.2rem; font: inherit; cursor: pointer; border: 0; border-radius: 6px;
           background: #4b5bdc; color: #fff; }
  button.secondary { background: #888; }
  button:disabled { opacity: .5; cursor: default; }
  progress { width: 100%; height: 1.1rem; }
  video { width: 100%; max-height: 60vh; background: #000; border-radius: 6px; }
  #status { font-size: .9rem; margin: .4rem 0; min-height: 1.2em; }
  #error { color: #b00020; }
  #gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: .8rem; }
  .item { border: 1px solid #ddd; border-radius: 6px; padding: .5rem; cursor: pointer; font-size: .8rem; }
  .item:hover { border-color: #4b5bdc; }
  .item .st { font-weight: 600; }
  .item img { width: 100%; border-radius: 4px; display: block; margin-bottom: .3rem; }
  #preview { width: 100%; max-height: 40vh; object-fit: contain; background: #000; border-radius: 6px;
             image-rendering: pixelated; }
</style>
</head>
<body>
<header><h1 style="margin:0;font-size:1.3rem">vidfusion</h1><small>__MODEL__</small></header>
<main>
<section>
  <form id="form">
    <label for="token">API token (only if the server asks for one)</label>
    <input id="token" type="password" autocomplete="off">
    <label for="prompt">Prompt</label>
    <textarea id="prompt" name="prompt" required placeholder="An astronaut riding a horse"></textarea>
    <label for="negative_prompt">Negative prompt</label>
    <input id="negative_prompt" name="negative_prompt">
    <div class="row">
      <div><label for="num_frames">Frames</label><input id="num_frames" type="number" min="1" value="16"></div>
      <div><label for="fps">FPS</label><input id="fps" type="number" min="1" max="60" value="8"></div>
      <div><label for="interpolate_fps">Smooth to FPS (empty: off)</label>
        <input id="interpolate_fps" type="number" min="2" max="120"></div>
      <div><label for="width">Width</label><input id="width" type="number" min="8" step="8" value="__W__"></div>
      <div><label for="height">Height</label><input id="height" type="number" min="8" step="8" value="__H__"></div>
      <div><label for="num_inference_steps">Steps</label>
        <input id="num_inference_steps" type="number" min="1" value="__STEPS__"></div>
      <div><label for="guidance_scale">Guidance</label>
        <input id="guidance_scale" type="number" min="0" step="0.5" value="__GUIDANCE__"></div>
      <div><label for="sampler">Sampler</label><select id="sampler">__SAMPLERS__</select></div>
      <div><label for="seed">Seed (empty: random)</label><input id="seed" type="number" min="0"></div>
      <div><label for="cache">Step caching</label><select id="cache"><option value="">off</option>
        <option value="deepcache">DeepCache (~2x)</option><option value="faster-diffusion">Faster Diffusion</option>
      </select></div>
    </div>
    <label for="image">First frame picture (optional)</label>
    <input id="image" type="file" accept="image/*">
    <label for="video">Input video: restyle or upscale it (optional; width / height resize it)</label>
    <input id="video" type="file" accept="video/*,image/gif">
    <label for="strength">Strength for the input video (0 keeps it, 1 ignores it)</label>
    <input id="strength" type="number" min="0" max="1" step="0.05" value="0.6">
    <fieldset id="loras" __LORAS_HIDDEN__><legend>LoRAs</legend>__LORAS__</fieldset>
    <button id="generate" type="submit">Generate</button>
    <button id="cancel" type="button" class="secondary" disabled>Cancel</button>
  </form>
</section>
<section>
  <progress id="progress" max="1" value="0"></progress>
  <div id="status">Idle.</div>
  <div id="error"></div>
  <img id="preview" alt="preview of the latest step" hidden>
  <video id="player" controls loop playsinline></video>
  <p><a id="download" href="#" hidden>Download mp4</a></p>
  <h2 style="font-size:1.05rem">Past jobs</h2>
  <div id="gallery"></div>
</section>
</main>
<script>
const $ = (id) => document.getElementById(id);
const CFG = __CONFIG__;
let current = null;
$("token").value = localStorage.getItem("vidfusion-token") || "";
$("sampler").addEventListener("change", () => {  // a few-step sampler brings its own steps and guidance
  const d = CFG.sampler_defaults[$("sampler").value];
  if (d) { $("num_inference_steps").value = d.steps; $("guidance_scale").value = d.guidance; }
});
for (const k of ["num_frames", "width", "height", "fps"])
  $(k).addEventListener("change", () => { $(k).dataset.touched = "1"; });
$("token").addEventListener("change", () => { localStorage.setItem("vidfusion-token", $("token").value); gallery(); });

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if ($("token").value) h["Authorization"] = "Bearer " + $("token").value;
  return h;
}
async function api(path, options) {
  options = options || {};
  const r = await fetch(path, Object.assign({}, options, {headers: headers(options.headers)}));
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { const j = await r.json(); msg = typeof j.detail === "string" ? j.detail :
          j.detail.map((d) => d.loc.slice(-1)[0] + ": " + d.msg).join("; "); } catch (e) {}
    throw new Error(msg);
  }
  return r;
}
function params() {
  const p = {prompt: $("prompt").value};
  if ($("negative_prompt").value) p.negative_prompt = $("negative_prompt").value;
  for (const k of ["num_frames", "fps", "width", "height", "num_inference_steps", "seed", "interpolate_fps"])
    if ($(k).value !== "") p[k] = parseInt($(k).value, 10);
  p.guidance_scale = parseFloat($("guidance_scale").value);
  if ($("sampler").value) p.sampler = $("sampler").value;
  if ($("cache").value) p.cache = $("cache").value;
  if ($("video").files.length) p.strength = parseFloat($("strength").value);
  if ($("video").files.length)  // the input's frames, size and rate unless changed here
    for (const k of ["num_frames", "width", "height", "fps"]) if ($(k).dataset.touched !== "1") delete p[k];
  p.loras = [];
  for (const box of document.querySelectorAll("#loras input[type=checkbox]:checked"))
    p.loras.push({name: box.value, weight: parseFloat($("weight-" + box.dataset.i).value)});
  return p;
}
function show(job) {
  const total = job.progress.total || 1;
  $("progress").max = total;
  $("progress").value = job.progress.step;
  $("status").textContent = job.status + " - step " + job.progress.step + " / " + job.progress.total;
  $("error").textContent = job.error || "";
}
async function image(path, img) {  // through fetch, so the token header is sent
  const r = await api(path);
  const old = img.src;
  img.src = URL.createObjectURL(await r.blob());
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
}
let previewStep = 0, previewBusy = false;
async function preview(job) {  // the latest step's latent preview while the job runs
  if (previewBusy || job.progress.step <= previewStep) return;
  previewBusy = true; previewStep = job.progress.step;
  try { await image("/v1/videos/" + job.id + "/preview", $("preview")); $("preview").hidden = false; }
  catch (e) { /* not there yet */ } finally { previewBusy = false; }
}
async function play(job) {
  $("preview").hidden = true;
  const r = await api("/v1/videos/" + job.id + "/content");
  const url = URL.createObjectURL(await r.blob());
  $("player").src = url;
  $("download").href = url;
  $("download").download = "vidfusion-" + job.id + ".mp4";
  $("download").hidden = false;
}
async function watch(id) {  // server-sent events over fetch, so the token header can be sent
  const r = await api("/v1/videos/" + id + "/events");
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", job = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += decoder.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\\n\\n")) >= 0) {
      const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
      for (const line of chunk.split("\\n"))
        if (line.startsWith("data: ")) { job = JSON.parse(line.slice(6)); show(job); preview(job); }
    }
  }
  return job;
}
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("generate").disabled = true; $("error").textContent = ""; $("download").hidden = true;
  try {
    let r;
    if ($("image").files.length || $("video").files.length) {  // input files: multipart upload
      const form = new FormData();
      form.append("params", JSON.stringify(params()));
      for (const k of ["image", "video"]) if ($(k).files.length) form.append(k, $(k).files[0]);
      r = await api("/v1/videos/upload", {method: "POST", body: form});
    } else {
      r = await api("/v1/videos", {method: "POST", body: JSON.stringify(params()),
                                   headers: {"Content-Type": "application/json"}});
    }
    current = (await r.json()).id;
    previewStep = 0;
    $("cancel").disabled = false;
    gallery();
    const job = await watch(current);
    if (job && job.status === "succeeded") await play(job);
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    $("generate").disabled = false; $("cancel").disabled = true; current = null;
    gallery();
  }
});
$("cancel").addEventListener("click", async () => {
  if (current) { try { await api("/v1/videos/" + current, {method: "DELETE"}); } catch (e) {
    $("error").textContent = e.message; } }
});
async function gallery() {
  try {
    const jobs = (await (await api("/v1/videos?limit=24")).json()).data;
    const g = $("gallery");
    g.replaceChildren();
    for (const job of jobs) {
      const d = document.createElement("div");
      d.className = "item";
      const st = document.createElement("div"); st.className = "st"; st.textContent = job.status;
      const pr = document.createElement("div"); pr.textContent = job.params.prompt;
      const when = document.createElement("div"); when.textContent = (job.created_at || "").replace("T", " ");
      if (job.status === "succeeded") {
        const poster = document.createElement("img");
        poster.alt = "poster"; poster.className = "poster";
        d.append(poster);
        image("/v1/videos/" + job.id + "/poster", poster).catch(() => poster.remove());
        d.addEventListener("click", () => { show(job); play(job); });
      }
      d.append(st, pr, when);
      g.append(d);
    }
  } catch (e) { /* no token yet */ }
}
gallery();
</script>
</body>
</html>
"""


def render_ui(settings: Any, samplers: Sequence[str]) -> str:
    """The page with this server's defaults filled in."""
    defaults = settings.sampler_defaults
    options = '<option value="">checkpoint default</option>' + "".join(
        f'<option value="{html.escape(s)}">{html.escape(s)}</option>' for s in samplers if s in defaults)
    config = {"max_frames": settings.max_frames, "max_pixels": settings.max_pixels,
              "sampler_defaults": {name: {"steps": steps, "guidance": guidance}
                                   for name, (steps, guidance) in defaults.items()}}
    steps, guidance = defaults[""]
    loras = "".join(
        f'<div class="lora"><input type="checkbox" id="lora-{i}" value="{html.escape(name)}" data-i="{i}">'
        f'<label for="lora-{i}">{html.escape(name)}</label>'
        f'<input id="weight-{i}" type="number" step="0.05" value="1" aria-label="weight of {html.escape(name)}"></div>'
        for i, name in enumerate(settings.loras))
    return (_PAGE.replace("__MODEL__", html.escape(settings.model)).replace("__W__", str(settings.default_width))
            .replace("__H__", str(settings.default_height)).replace("__STEPS__", str(steps))
            .replace("__GUIDANCE__", f"{guidance:g}").replace("__SAMPLERS__", options)
            .replace("__LORAS_HIDDEN__", "" if settings.loras else "hidden").replace("__LORAS__", loras)
            .replace("__CONFIG__", json.dumps(config)))
