// fewstep live page: WS /v1/stream, JPEG/WebP frames drawn on a canvas, readouts measured in this browser.
// Plain JS, no build step. The binary frame header (24 bytes, little-endian) is documented in
// server/stream_protocol.py: magic "FSTR", version u8, payload type u8, prompt version u16, frame index u64,
// timestamp f64 (ms since the session started, server clock).
//
// Everything the page measures is also on window.fewstep (the browser tests read it):
//   state, sessionId, framesReceived, framesDrawn, lastIndex, promptVersion, ttffMs, fps,
//   droppedServer (gaps in frame indices), droppedLocal (frames this page skipped to stay live), hashes.
"use strict";

(function () {
  const HEADER_BYTES = 24;
  const MIME = { 1: "image/jpeg", 2: "image/webp" };
  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");

  const S = (window.fewstep = {
    state: "idle", sessionId: null, framesReceived: 0, framesDrawn: 0, lastIndex: -1, promptVersion: 0,
    ttffMs: null, fps: 0, droppedServer: 0, droppedLocal: 0, hashes: [], lastHash: null, errors: [],
    stats: null, started: null,
  });

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

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.className = isError ? "error" : "";
  }

  function setRunning(running) {
    $("start").disabled = running;
    $("stop").disabled = !running;
    $("update").disabled = !running;
  }

  function readouts() {
    const now = performance.now();
    arrivals = arrivals.filter((t) => now - t <= 1000);
    S.fps = arrivals.length;
    $("fps-readout").textContent = S.state === "running" ? S.fps.toFixed(0) : "-";
    $("ttff-readout").textContent = S.ttffMs == null ? "-" : S.ttffMs.toFixed(0) + " ms";
    $("dropped-readout").textContent = String(S.droppedServer + S.droppedLocal);
    $("frames-readout").textContent = String(S.framesReceived);
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
    if (buf.byteLength < HEADER_BYTES || view.getUint32(0, false) !== 0x46535452) return;  // "FSTR"
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

  function onMessage(ev) {
    if (typeof ev.data !== "string") { onFrame(ev.data); return; }
    const msg = JSON.parse(ev.data);
    if (msg.type === "started") {
      S.started = msg;
      S.sessionId = msg.session_id;
      S.state = "running";
      $("session-id").textContent = msg.session_id;
      const link = $("mjpeg-link");
      const key = $("key").value.trim();
      link.href = msg.mjpeg_url + (key ? "?token=" + encodeURIComponent(key) : "");
      link.hidden = false;
      const fps = msg.fps > 0 ? msg.fps : 30;
      frameIntervalMs = 1000 / fps;
      setStatus(`running: ${msg.width}x${msg.height}, seed ${msg.seed}, ${msg.fps > 0 ? msg.fps + " fps target" :
        "unpaced"}`);
      setRunning(true);
      if (playTimer == null) tick();
    } else if (msg.type === "stats") {
      S.stats = msg;
    } else if (msg.type === "updated") {
      setStatus(`prompt updated: ${msg.prompt}`);
    } else if (msg.type === "error") {
      S.errors.push(msg.message);
      setStatus(`error: ${msg.message}`, true);
    } else if (msg.type === "stopped") {
      S.state = "stopped";
      setStatus(`stopped (${msg.reason}): ${msg.frames_sent} frames sent, ${msg.frames_dropped} dropped`);
      setRunning(false);
    }
  }

  function start() {
    if (ws && ws.readyState <= 1) return;
    Object.assign(S, { state: "connecting", sessionId: null, framesReceived: 0, framesDrawn: 0, lastIndex: -1,
      promptVersion: 0, ttffMs: null, droppedServer: 0, droppedLocal: 0, hashes: [], lastHash: null, errors: [],
      stats: null, started: null });
    queue = [];
    const msg = { type: "start", prompt: $("prompt").value, format: $("format").value };
    const seed = $("seed").value, size = $("size").value.trim(), fps = $("fps").value;
    if (seed !== "") msg.seed = Number(seed);
    if (size !== "") msg.size = /^\d+$/.test(size) ? Number(size) : size;
    if (fps !== "") msg.fps = Number(fps);
    // Browsers cannot set headers on a WebSocket: the key goes as ?token= (the server drops it from its logs).
    const key = $("key").value.trim();
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/stream" +
      (key ? "?token=" + encodeURIComponent(key) : "");
    tStart = performance.now();
    ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => ws.send(JSON.stringify(msg));
    ws.onmessage = onMessage;
    ws.onerror = () => setStatus("connection error", true);
    ws.onclose = (ev) => {
      if (S.state !== "stopped") S.state = "closed";
      setRunning(false);
      // refused before the handshake (wrong key, foreign origin, too many streams): the page only sees 1006
      if (S.state === "closed" && !S.started) {
        setStatus(`connection refused or closed (code ${ev.code}): check the API key`, true);
      } else if (ev.code === 4408) {
        setStatus("closed: idle for too long", true);
      }
    };
    setStatus("connecting ...");
  }

  function update() {
    if (ws && ws.readyState === 1) ws.send(JSON.stringify({ type: "update", prompt: $("prompt").value }));
  }

  function stop() {
    if (ws && ws.readyState === 1) ws.send(JSON.stringify({ type: "stop" }));
  }

  // The API key lives in this browser's localStorage, for this server's origin only.
  const KEY_STORE = "fewstep.apiKey";
  $("key").value = localStorage.getItem(KEY_STORE) || "";
  $("key").addEventListener("change", () => {
    const key = $("key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
  });
  // fetch() from this page (none yet) sends it as a header, the way OpenAI's SDK does.
  window.fewstep.authHeaders = () => {
    const key = $("key").value.trim();
    return key ? { Authorization: "Bearer " + key } : {};
  };

  $("start").addEventListener("click", start);
  $("update").addEventListener("click", update);
  $("stop").addEventListener("click", stop);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key !== "Enter") return;
    if (S.state === "running") update(); else start();
  });
  window.addEventListener("beforeunload", () => { if (ws) ws.close(); });
})();
