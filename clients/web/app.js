// fewstep page: images (POST /v1/images/generations, a gallery with downloads) and live streams (WS /v1/stream,
// from a prompt or from the camera), with recording. Plain JS, no build step, no external assets.
//
// The binary frame header (24 bytes, little-endian) is documented in server/stream_protocol.py: magic "FSTR",
// version u8, payload type u8, prompt version u16, frame index u64, timestamp f64. Camera frames go to the server
// with the same header (payload type 1 JPEG, prompt version 0, this page's frame counter, this page's ms clock).
//
// Everything the page measures is also on window.fewstep (the browser tests read it):
//   mode, models, modelsLoaded, state, sessionId, framesReceived, framesDrawn, lastIndex, promptVersion, ttffMs,
//   fps, droppedServer (gaps in frame indices), droppedLocal (frames this page skipped to stay live), hashes,
//   inputFramesSent (camera), images (the gallery), recording, lastRecording.
"use strict";

(function () {
  const HEADER_BYTES = 24;
  const MAGIC = 0x46535452;  // "FSTR"
  const MIME = { 1: "image/jpeg", 2: "image/webp" };
  const FALLBACK_PROMPT = "a red circle moving right";  // only when the server lists no example prompts
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");

  const S = (window.fewstep = {
    mode: null, models: [], modelsLoaded: null, images: [], generating: false,
    state: "idle", sessionId: null, framesReceived: 0, framesDrawn: 0, lastIndex: -1, promptVersion: 0,
    ttffMs: null, fps: 0, droppedServer: 0, droppedLocal: 0, hashes: [], lastHash: null, errors: [],
    stats: null, started: null, input: "text", inputFramesSent: 0, recording: false, lastRecording: null,
  });

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.className = isError ? "error" : "";
  }

  // -- API key: kept in this browser's localStorage, for this server's origin only ---------------------------------
  const KEY_STORE = "fewstep.apiKey";
  $("key").value = localStorage.getItem(KEY_STORE) || "";
  const apiKey = () => $("key").value.trim();
  // fetch() sends it as a header, the way OpenAI's SDK does; a browser cannot set headers on a WebSocket, so the
  // sockets carry it as ?token= (the server drops it from its logs)
  const authHeaders = () => (apiKey() ? { Authorization: "Bearer " + apiKey() } : {});
  S.authHeaders = authHeaders;
  const wsUrl = (path) => (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path +
    (apiKey() ? "?token=" + encodeURIComponent(apiKey()) : "");

  async function apiError(r) {
    try {
      const body = await r.json();
      if (body && body.error && body.error.message) return `${r.status}: ${body.error.message}`;
    } catch (e) { /* not JSON */ }
    return `HTTP ${r.status}`;
  }

  // -- models, modes and example prompts ---------------------------------------------------------------------------
  const modelsOf = (kind) => S.models.filter((m) => m.kind === kind);
  const selectedModel = () => {
    const id = $(S.mode === "image" ? "img-model" : "stream-model").value;
    return S.models.find((m) => m.id === id) || modelsOf(S.mode === "image" ? "image" : "video")[0] || null;
  };
  let promptEdited = false;
  $("prompt").addEventListener("input", () => { promptEdited = true; });

  function fillSelect(sel, models) {
    sel.textContent = "";
    for (const m of models) sel.add(new Option(m.id, m.id));
  }

  function imageSizes(card) {
    const native = `${card.default_size}x${card.default_size}`;
    const sizes = [native, ...((card.sizes || "").match(/\b\d+x\d+\b/g) || [])];
    const range = /sides from (\d+) to (\d+)/.exec(card.sizes || "");
    if (range) {
      for (const side of [256, 512, 768, 1024]) {
        if (side >= Number(range[1]) && side <= Number(range[2])) sizes.push(`${side}x${side}`);
      }
    }
    return [...new Set(sizes)];
  }

  function showModel() {
    const card = selectedModel();
    const chips = $("examples");
    chips.textContent = "";
    // a negative prompt only where the model takes one (guidance modes nasa or cfg); others would answer 400
    const modes = (card && card.guidance_modes) || [];
    $("negative-row").hidden = !(modes.includes("nasa") || modes.includes("cfg"));
    if (!card) {
      $("model-info").textContent = S.modelsLoaded ? `no ${S.mode === "image" ? "image" : "video"} model served` : "";
      if (!promptEdited && !$("prompt").value) $("prompt").value = FALLBACK_PROMPT;
      return;
    }
    $("model-info").textContent = `${card.id} · ${card.default_size} px` +
      (card.kind === "video" ? ` · ${card.fps} fps` : ` · ${card.default_steps} step${card.default_steps > 1 ? "s" : ""}`);
    for (const text of card.example_prompts || []) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "chip";
      b.textContent = text;
      b.addEventListener("click", () => {
        $("prompt").value = text;
        promptEdited = true;
        if (S.mode === "image") generate();
        else if (S.state === "running") update();
      });
      chips.append(b);
    }
    if (!promptEdited) $("prompt").value = (card.example_prompts || [])[0] || FALLBACK_PROMPT;
    if (card.kind === "image") {
      const sizeSel = $("img-size");
      sizeSel.textContent = "";
      for (const s of imageSizes(card)) sizeSel.add(new Option(s, s));
      $("img-steps").value = card.default_steps || "";
      $("img-guidance").value = card.default_guidance_scale ?? "";
      $("img-guidance-label").hidden = card.default_guidance_scale == null;
    }
  }

  function setMode(mode) {
    if (mode === S.mode) return;
    if (S.mode && (S.state === "running" || S.state === "connecting")) stop();
    S.mode = mode;
    document.body.classList.toggle("image", mode === "image");
    document.body.classList.toggle("stream", mode === "stream");
    $("tab-image").setAttribute("aria-selected", String(mode === "image"));
    $("tab-stream").setAttribute("aria-selected", String(mode === "stream"));
    history.replaceState(null, "", "#" + mode);
    // an example prompt of the other mode's model is replaced by this mode's: the two models draw different things
    const p = $("prompt").value;
    if (!p.trim() || S.models.some((m) => (m.example_prompts || []).includes(p))) promptEdited = false;
    showModel();
  }

  async function loadModels() {
    try {
      const r = await fetch("/v1/models", { headers: authHeaders() });
      if (!r.ok) throw new Error(await apiError(r));
      S.models = (await r.json()).data;
      S.modelsLoaded = true;
    } catch (e) {
      S.models = [];
      S.modelsLoaded = false;
      const needsKey = String(e.message).startsWith("401");
      if (needsKey) $("key-box").open = true;
      setStatus(`could not list the models (${e.message})` + (needsKey ? ": enter the server's API key" : ""), true);
    }
    fillSelect($("img-model"), modelsOf("image"));
    fillSelect($("stream-model"), modelsOf("video"));
    $("tab-image").disabled = S.modelsLoaded && !modelsOf("image").length;
    $("tab-stream").disabled = S.modelsLoaded && !modelsOf("video").length;
    const wanted = location.hash.slice(1);
    let mode = wanted === "image" || wanted === "stream" ? wanted : (modelsOf("image").length || !S.modelsLoaded ?
      "image" : "stream");
    if (S.modelsLoaded && mode === "image" && !modelsOf("image").length) mode = "stream";
    if (S.modelsLoaded && mode === "stream" && !modelsOf("video").length && modelsOf("image").length) mode = "image";
    S.mode = null;
    setMode(mode);
    if (S.modelsLoaded && S.state === "idle") setStatus("ready");
  }

  // -- image mode --------------------------------------------------------------------------------------------------
  // Seeds the page leaves blank are drawn here, below 2^31: the server's own go up to 2^62, which a JavaScript number
  // cannot hold exactly, and a seed shown on the page must reproduce its image.
  const randomSeed = () => crypto.getRandomValues(new Uint32Array(1))[0] >>> 1;
  const slug = (text) => text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 48);

  function b64ToBlob(b64, type) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Blob([bytes], { type });
  }

  function addCard(item) {
    const card = document.createElement("figure");
    card.className = "card";
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = item.prompt;
    if (item.width <= 256) img.className = "pixelated";  // small native sizes: show pixels, not blur
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    const caption = document.createElement("span");
    caption.className = "caption";
    caption.textContent = item.prompt;
    caption.title = `${item.prompt}\nseed ${item.seed} · ${item.size} · ${item.ms.toFixed(0)} ms`;
    const seed = document.createElement("span");
    seed.textContent = `seed ${item.seed}`;
    const dl = document.createElement("a");
    dl.className = "download";
    dl.href = item.url;
    dl.download = item.name;
    dl.textContent = "Download";
    meta.append(caption, seed, dl);
    card.append(img, meta);
    card.style.margin = "0";
    $("gallery").prepend(card);
    $("gallery-empty").hidden = true;
  }

  // the negative prompt for a request of the selected model: null where the model takes none (the box is hidden)
  function negativePrompt() {
    return $("negative-row").hidden ? null : $("negative").value.trim();
  }

  async function generate() {
    const prompt = $("prompt").value.trim();
    if (!prompt) { setStatus("type a prompt first", true); return; }
    if (S.generating) return;
    const card = selectedModel();
    const body = { prompt, n: Number($("img-n").value) || 1, output_format: "png" };
    if (card) body.model = card.id;
    if ($("img-size").value) body.size = $("img-size").value;
    body.seed = $("img-seed").value !== "" ? Number($("img-seed").value) : randomSeed();
    const steps = $("img-steps").value;
    if (steps !== "" && (!card || Number(steps) !== card.default_steps)) body.num_inference_steps = Number(steps);
    const g = $("img-guidance").value;
    if (g !== "" && (!card || Number(g) !== card.default_guidance_scale)) body.guidance_scale = Number(g);
    const negative = negativePrompt();
    if (negative) body.negative_prompt = negative;
    S.generating = true;
    $("generate").disabled = true;
    setStatus(`generating ${body.n} image${body.n > 1 ? "s" : ""} ...`);
    const t0 = performance.now();
    try {
      const r = await fetch("/v1/images/generations", {
        method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, body: JSON.stringify(body),
      });
      if (!r.ok) throw new Error(await apiError(r));
      const res = await r.json();
      const ms = performance.now() - t0;
      const size = body.size || (card ? `${card.default_size}x${card.default_size}` : "");
      for (const d of res.data) {
        const blob = b64ToBlob(d.b64_json, "image/png");
        const item = { prompt, seed: d.seed, size, width: Number(size.split("x")[0]) || 64, ms, bytes: blob.size,
          url: URL.createObjectURL(blob), name: `fewstep-${slug(prompt)}-seed${d.seed}.png` };
        S.images.push(item);
        addCard(item);
      }
      const t = res.timings || {};
      setStatus(`${res.data.length} image${res.data.length > 1 ? "s" : ""} in ${ms.toFixed(0)} ms` +
        (t.total != null ? ` (server ${t.total.toFixed(0)} ms)` : ""));
    } catch (e) {
      S.errors.push(String(e.message));
      setStatus(`error: ${e.message}`, true);
    } finally {
      S.generating = false;
      $("generate").disabled = false;
    }
  }

  $("clear-gallery").addEventListener("click", () => {
    for (const item of S.images) URL.revokeObjectURL(item.url);
    S.images = [];
    $("gallery").textContent = "";
    $("gallery-empty").hidden = false;
  });

  // -- stream mode: socket, frames, playout ------------------------------------------------------------------------
  let ws = null;
  let tStart = 0;
  let arrivals = [];        // arrival times (ms) of the last second of frames, for the fps readout
  let decodeChain = Promise.resolve();
  let queue = [];           // decoded frames waiting to be shown: {bitmap, index}
  let playTimer = null;
  let frameIntervalMs = 125;

  function fnv1a(bytes) {   // 32-bit FNV-1a of a frame's payload: lets tests tell streams apart
    let h = 0x811c9dc5;
    for (let i = 0; i < bytes.length; i++) {
      h ^= bytes[i];
      h = Math.imul(h, 0x01000193) >>> 0;
    }
    return h.toString(16).padStart(8, "0");
  }

  function setRunning(running) {
    const busy = running || S.state === "connecting";
    $("start").disabled = busy;
    $("stop").disabled = !busy;
    $("update").disabled = !running;
    $("record").disabled = !running && !S.recording;
    $("camera").disabled = busy;  // the input kind is fixed when the stream starts
    $("stream-model").disabled = busy;
  }

  const ms = (v) => (v >= 10000 ? (v / 1000).toFixed(1) + " s" : v.toFixed(0) + " ms");

  function readouts() {
    const now = performance.now();
    arrivals = arrivals.filter((t) => now - t <= 1000);
    S.fps = arrivals.length;
    $("fps-readout").textContent = S.state === "running" ? S.fps.toFixed(0) : "-";
    $("ttff-readout").textContent = S.ttffMs == null ? "-" : ms(S.ttffMs);
    $("step-readout").textContent = S.stats && S.stats.step_ms != null ? ms(S.stats.step_ms) : "-";
    $("dropped-readout").textContent = String(S.droppedServer + S.droppedLocal);
    $("frames-readout").textContent = String(S.framesReceived);
    $("sent-readout").textContent = S.input === "frames" ? String(S.inputFramesSent) : "-";
    if (S.recording) $("record-info").textContent = `recording ${((now - recStart) / 1000).toFixed(0)} s`;
  }
  setInterval(readouts, 250);

  function draw(item) {
    if (canvas.width !== item.bitmap.width || canvas.height !== item.bitmap.height) {
      canvas.width = item.bitmap.width;
      canvas.height = item.bitmap.height;
    }
    ctx.drawImage(item.bitmap, 0, 0);
    item.bitmap.close();
    S.framesDrawn++;
    if (S.ttffMs == null) S.ttffMs = performance.now() - tStart;
    if (recorder) recordFrame();
  }

  // Playout: frames arrive in chunks; show them evenly at the stream's rate. The queue holds at most two chunks:
  // beyond that this page is behind (slow decode, hidden tab), so it skips the oldest frames and counts them.
  function tick() {
    const maxQueue = 2 * ((S.started && S.started.chunk_frames) || 1);
    while (queue.length > maxQueue) {
      queue.shift().bitmap.close();
      S.droppedLocal++;
    }
    if (queue.length) draw(queue.shift());
    playTimer = setTimeout(tick, frameIntervalMs);
  }

  function onFrame(buf) {
    const view = new DataView(buf);
    if (buf.byteLength < HEADER_BYTES || view.getUint32(0, false) !== MAGIC) return;
    const type = view.getUint8(5);
    const promptVersion = view.getUint16(6, true);
    const index = Number(view.getBigUint64(8, true));
    const payload = new Uint8Array(buf, HEADER_BYTES);
    if (S.lastIndex >= 0 && index > S.lastIndex + 1) S.droppedServer += index - S.lastIndex - 1;
    S.lastIndex = index;
    S.promptVersion = promptVersion;
    S.framesReceived++;
    arrivals.push(performance.now());
    const hash = fnv1a(payload);
    S.lastHash = hash;
    S.hashes.push(hash);
    if (S.hashes.length > 256) S.hashes.shift();
    const blob = new Blob([payload], { type: MIME[type] || "image/jpeg" });
    decodeChain = decodeChain.then(() => createImageBitmap(blob)).then((bitmap) => {
      queue.push({ bitmap, index });
    }).catch((e) => S.errors.push("decode: " + e));
  }

  // The session ended (stopped, failed, refused, socket closed): the page's side of it ends too, and the socket is
  // closed by the page, so that the next Start opens a fresh one (the server would keep an unused socket open until
  // its idle timeout, then close it with 4408).
  function ended(state) {
    S.state = state;
    stopSending();
    if (recorder) stopRecording();
    dropSocket();
    setRunning(false);
  }

  function dropSocket() {
    const old = ws;
    ws = null;
    if (!old) return;
    old.onopen = old.onmessage = old.onerror = old.onclose = null;
    if (old.readyState <= 1) old.close(1000, "done");
  }

  function onMessage(ev) {
    if (typeof ev.data !== "string") { onFrame(ev.data); return; }
    const msg = JSON.parse(ev.data);
    if (msg.type === "started") {
      S.started = msg;
      S.sessionId = msg.session_id;
      S.state = "running";
      $("session-id").textContent = msg.session_id;
      const link = $("mjpeg-link");
      link.href = msg.mjpeg_url + (apiKey() ? "?token=" + encodeURIComponent(apiKey()) : "");
      link.hidden = false;
      const fps = msg.fps > 0 ? msg.fps : 30;
      frameIntervalMs = 1000 / fps;
      setStatus(`running: ${msg.width}x${msg.height}, seed ${msg.seed}, ${msg.fps > 0 ? msg.fps + " fps target" :
        "unpaced"}` + (S.input === "frames" ? ", camera input" : ""));
      setRunning(true);
      if (playTimer == null) tick();
      if (S.input === "frames") startSending(msg.width, msg.height, fps);
    } else if (msg.type === "stats") {
      S.stats = msg;
    } else if (msg.type === "updated") {
      setStatus(`prompt updated: ${msg.prompt}` + (msg.strength != null ? `, strength ${msg.strength}` : ""));
    } else if (msg.type === "error") {
      S.errors.push(msg.message);
      setStatus(`error: ${msg.message}`, true);
      if (S.state === "connecting") ended("error");  // 'start' was refused: no session; Start works again
    } else if (msg.type === "stopped") {
      const text = `stopped (${msg.reason}): ${msg.frames_sent} frames sent, ${msg.frames_dropped} dropped`;
      ended("stopped");
      if (!msg.reason.startsWith("error")) setStatus(text);
    }
  }

  function resetStream() {
    Object.assign(S, { state: "connecting", sessionId: null, framesReceived: 0, framesDrawn: 0, lastIndex: -1,
      promptVersion: 0, ttffMs: null, droppedServer: 0, droppedLocal: 0, hashes: [], lastHash: null, errors: [],
      stats: null, started: null, inputFramesSent: 0 });
    for (const item of queue) item.bitmap.close();
    queue = [];
  }

  function start() {
    if (S.state === "connecting" || S.state === "running") return;
    const prompt = $("prompt").value.trim();
    if (!prompt) { setStatus("type a prompt first", true); return; }
    const camera = $("camera").checked;
    if (camera && !camStream) { setStatus("the camera is not on yet", true); return; }
    dropSocket();  // a socket left from a stopped or refused session
    resetStream();
    S.input = camera ? "frames" : "text";
    const msg = { type: "start", prompt, format: $("format").value };
    const card = selectedModel();
    if (card) msg.model = card.id;
    const seed = $("seed").value, size = $("size").value.trim(), fps = $("fps").value;
    msg.seed = seed !== "" ? Number(seed) : randomSeed();
    if (size !== "") msg.size = /^\d+$/.test(size) ? Number(size) : size;
    if (fps !== "") msg.fps = Number(fps);
    const negative = negativePrompt();
    if (negative) msg.negative_prompt = negative;
    if (camera) {  // camera/image input protocol: fields sent only with it, so text streams work on any server
      msg.input = "frames";
      msg.strength = Number($("strength").value);
    }
    tStart = performance.now();
    const sock = new WebSocket(wsUrl("/v1/stream"));
    ws = sock;
    sock.binaryType = "arraybuffer";
    sock.onopen = () => sock.send(JSON.stringify(msg));
    sock.onmessage = onMessage;
    sock.onerror = () => setStatus("connection error", true);
    sock.onclose = (ev) => {
      const wasStarted = !!S.started;
      ws = null;
      ended("closed");
      // refused before the handshake (wrong key, foreign origin, too many streams): the page only sees 1006
      if (!wasStarted) setStatus(`connection refused or closed (code ${ev.code}): check the API key`, true);
      else if (ev.code === 4408) setStatus("closed: idle for too long", true);
      else setStatus(`connection closed (code ${ev.code})`, true);
    };
    setRunning(false);
    setStatus("connecting ...");
  }

  function update() {
    if (!ws || ws.readyState !== 1 || S.state !== "running") return;
    const msg = { type: "update", prompt: $("prompt").value };
    if (S.input === "frames") msg.strength = Number($("strength").value);
    const negative = negativePrompt();
    if (negative !== null) msg.negative_prompt = negative;  // "" clears the stream's negative prompt
    ws.send(JSON.stringify(msg));
  }

  function stop() {
    if (ws && ws.readyState === 1 && S.state === "running") {
      ws.send(JSON.stringify({ type: "stop" }));  // the server answers 'stopped'; ended() closes the socket then
    } else if (ws) {
      ended("stopped");
      setStatus("stopped");
    }
  }

  // -- camera input ------------------------------------------------------------------------------------------------
  let camStream = null;
  let sendTimer = null;
  let encoding = false;
  let inputIndex = 0;
  const inputCanvas = document.createElement("canvas");
  const inputCtx = inputCanvas.getContext("2d");
  const video = $("camera-preview");

  async function cameraOn() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("this browser offers no camera here (a camera needs https or localhost)");
    }
    camStream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } },
      audio: false });
    video.srcObject = camStream;
    await video.play();
    video.hidden = false;
  }

  function cameraOff() {
    if (camStream) for (const t of camStream.getTracks()) t.stop();
    camStream = null;
    video.srcObject = null;
    video.hidden = true;
  }

  $("camera").addEventListener("change", async () => {
    const on = $("camera").checked;
    $("strength-label").hidden = !on;
    if (!on) { cameraOff(); return; }
    try {
      await cameraOn();
      setStatus("camera on: Start streams it through the model");
    } catch (e) {
      $("camera").checked = false;
      $("strength-label").hidden = true;
      setStatus(`camera: ${e.message || e}`, true);
    }
  });
  $("strength").addEventListener("input", () => {
    $("strength-value").textContent = Number($("strength").value).toFixed(2);
  });
  $("strength").addEventListener("change", () => {  // mid-stream, the strength alone (the prompt stays as it is)
    if (ws && ws.readyState === 1 && S.state === "running" && S.input === "frames") {
      ws.send(JSON.stringify({ type: "update", strength: Number($("strength").value) }));
    }
  });

  // Input frames at the stream's rate: the server uses the newest and drops the rest, so sending faster only costs
  // bandwidth; a frame is skipped while the previous one is still encoding or the socket is backed up.
  function startSending(width, height, fps) {
    inputCanvas.width = width;
    inputCanvas.height = height;
    inputIndex = 0;
    stopSending();
    sendTimer = setInterval(sendInputFrame, Math.max(1000 / fps, 33));
    sendInputFrame();
  }

  function stopSending() {
    if (sendTimer != null) clearInterval(sendTimer);
    sendTimer = null;
  }

  function sendInputFrame() {
    const sock = ws;
    if (!sock || sock.readyState !== 1 || !camStream || encoding || !video.videoWidth) return;
    if (sock.bufferedAmount > 1 << 20) return;
    // center crop to the stream's aspect ratio, then scale to its size
    const vw = video.videoWidth, vh = video.videoHeight, target = inputCanvas.width / inputCanvas.height;
    let sw = vw, sh = vh;
    if (vw / vh > target) sw = Math.round(vh * target); else sh = Math.round(vw / target);
    inputCtx.drawImage(video, (vw - sw) / 2, (vh - sh) / 2, sw, sh, 0, 0, inputCanvas.width, inputCanvas.height);
    encoding = true;
    inputCanvas.toBlob(async (blob) => {
      try {
        if (!blob || ws !== sock || sock.readyState !== 1) return;
        const payload = new Uint8Array(await blob.arrayBuffer());
        const buf = new ArrayBuffer(HEADER_BYTES + payload.length);
        const v = new DataView(buf);
        v.setUint32(0, MAGIC, false);
        v.setUint8(4, 1);                       // header version
        v.setUint8(5, 1);                       // payload type: JPEG
        v.setUint16(6, 0, true);                // prompt version: 0 on input frames
        v.setBigUint64(8, BigInt(inputIndex++), true);
        v.setFloat64(16, performance.now(), true);
        new Uint8Array(buf, HEADER_BYTES).set(payload);
        sock.send(buf);
        S.inputFramesSent++;
      } finally {
        encoding = false;
      }
    }, "image/jpeg", 0.9);
  }

  // -- recording: the shown frames, scaled up, through MediaRecorder -----------------------------------------------
  let recorder = null;
  let recChunks = [];
  let recStart = 0;
  let recType = "";
  const recCanvas = document.createElement("canvas");
  const recCtx = recCanvas.getContext("2d");
  // MP4 where this browser records it (recent Chromium), else WebM; the file is named by what it holds
  const REC_TYPES = ["video/mp4;codecs=avc1.42E01E", "video/mp4", "video/webm;codecs=vp9", "video/webm;codecs=vp8",
    "video/webm"];

  function recordFrame() {
    recCtx.imageSmoothingEnabled = false;  // small native sizes stay crisp pixels
    recCtx.drawImage(canvas, 0, 0, recCanvas.width, recCanvas.height);
  }

  function startRecording() {
    if (typeof MediaRecorder === "undefined") { setStatus("this browser cannot record (no MediaRecorder)", true); return; }
    // at least 512 px on the long side, even sides (H.264 needs them)
    const scale = Math.max(1, Math.ceil(512 / Math.max(canvas.width, canvas.height)));
    recCanvas.width = 2 * Math.ceil(canvas.width * scale / 2);
    recCanvas.height = 2 * Math.ceil(canvas.height * scale / 2);
    recordFrame();
    const type = REC_TYPES.find((t) => MediaRecorder.isTypeSupported(t)) || "";
    const fps = (S.started && S.started.fps > 0) ? S.started.fps : 30;
    const stream = recCanvas.captureStream(Math.max(fps, 1));
    recorder = new MediaRecorder(stream, type ? { mimeType: type, videoBitsPerSecond: 4e6 } : {});
    recType = recorder.mimeType || type || "video/webm";
    recChunks = [];
    recorder.ondataavailable = (e) => { if (e.data && e.data.size) recChunks.push(e.data); };
    const session = S.sessionId || "stream";
    recorder.onstop = () => {
      const isMp4 = recType.startsWith("video/mp4");
      const blob = new Blob(recChunks, { type: isMp4 ? "video/mp4" : "video/webm" });
      const name = `fewstep-${session.slice(0, 12)}.${isMp4 ? "mp4" : "webm"}`;
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = name;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
      S.lastRecording = { name, bytes: blob.size, type: recType };
      $("record-info").textContent = `saved ${name} (${(blob.size / 1024).toFixed(0)} KiB)`;
    };
    recorder.start(500);
    recStart = performance.now();
    S.recording = true;
    const btn = $("record");
    btn.textContent = "Stop recording";
    btn.classList.add("recording");
  }

  function stopRecording() {
    const r = recorder;
    recorder = null;
    S.recording = false;
    const btn = $("record");
    btn.textContent = "Record";
    btn.classList.remove("recording");
    btn.disabled = S.state !== "running";
    if (r && r.state !== "inactive") r.stop();
  }

  $("record").addEventListener("click", () => (recorder ? stopRecording() : startRecording()));

  // -- wiring ------------------------------------------------------------------------------------------------------
  $("key").addEventListener("change", () => {
    const key = apiKey();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    loadModels();
  });
  $("tab-image").addEventListener("click", () => setMode("image"));
  $("tab-stream").addEventListener("click", () => setMode("stream"));
  $("img-model").addEventListener("change", showModel);
  $("stream-model").addEventListener("change", showModel);
  $("generate").addEventListener("click", generate);
  $("start").addEventListener("click", start);
  $("update").addEventListener("click", update);
  $("stop").addEventListener("click", stop);
  for (const box of ["prompt", "negative"]) {  // Enter in either prompt box: generate, update or start
    $(box).addEventListener("keydown", (e) => {
      if (e.key !== "Enter") return;
      if (S.mode === "image") generate();
      else if (S.state === "running") update();
      else start();
    });
  }
  window.addEventListener("hashchange", () => {
    const m = location.hash.slice(1);
    if (m === "image" || m === "stream") setMode(m);
  });
  window.addEventListener("beforeunload", () => { dropSocket(); cameraOff(); });
  setRunning(false);
  loadModels();
})();
