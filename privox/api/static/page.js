// The try-it page's script (privox/api/static/index.html): record and
// transcribe through /stt, type and hear through /tts. No framework.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const key = $("key"), status = $("status"), player = $("player");
  const record = $("record"), stop = $("stop"), speak = $("speak");
  let recorder = null, chunks = [], audioUrl = null;

  key.value = localStorage.getItem("privox-key") || key.value;
  key.addEventListener("input", () => localStorage.setItem("privox-key", key.value.trim()));

  function say(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  // "401: the key was not accepted": the status and the body's one-line
  // reason (plain text on /stt and /tts, OpenAI's JSON shape on /v1).
  async function failure(response) {
    let reason = (await response.text()).trim();
    try { reason = JSON.parse(reason).error.message || reason; } catch (e) { /* plain text */ }
    return `Error ${response.status}: ${reason.split("\n")[0] || response.statusText}`;
  }

  async function post(path, form, accept) {
    // No key field at all where none is given: anonymous use, if allowed.
    if (key.value.trim()) form.append("key", key.value.trim());
    const response = await fetch(path, { method: "POST", body: form, headers: { Accept: accept } });
    if (!response.ok) throw new Error(await failure(response));
    return response;
  }

  record.addEventListener("click", async () => {
    if (!window.MediaRecorder || !navigator.mediaDevices) {
      return say("This browser cannot record audio (no MediaRecorder).", true);
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      return say(`No microphone: ${e.message || e.name}`, true);
    }
    chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (event) => { if (event.data.size) chunks.push(event.data); };
    recorder.onstop = () => {
      stream.getTracks().forEach((track) => track.stop());
      transcribe(new Blob(chunks, { type: recorder.mimeType || "audio/webm" }));
    };
    recorder.start();
    record.disabled = true;
    stop.disabled = false;
    say("Recording… press Stop when you are done.");
  });

  stop.addEventListener("click", () => {
    if (recorder && recorder.state !== "inactive") recorder.stop();
    stop.disabled = true;
  });

  async function transcribe(blob) {
    say("Transcribing…");
    const form = new FormData();
    form.append("quality", $("quality").value);
    form.append("language", $("language").value);
    form.append("file", blob, "recording." + (blob.type.includes("ogg") ? "ogg" : "webm"));
    try {
      const result = await (await post("/stt", form, "application/json")).json();
      $("transcript").textContent = result.text;
      say(`Transcribed ${result.duration_s ? result.duration_s.toFixed(1) + " s" : "audio"} with ${result.model}.`);
    } catch (e) {
      say(e.message, true);
    } finally {
      record.disabled = false;
    }
  }

  speak.addEventListener("click", async () => {
    const text = $("tts-text").value.trim();
    if (!text) return say("Type something to speak first.", true);
    speak.disabled = true;
    say("Speaking…");
    const form = new FormData();
    form.append("text", text);
    form.append("voice", $("voice").value);
    try {
      const response = await post("/tts", form, "audio/wav");
      // /tts answers audio/x-wav, as the original did; either name is a WAV.
      const type = (response.headers.get("Content-Type") || "").split(";")[0].trim();
      if (type !== "audio/wav" && type !== "audio/x-wav") {
        throw new Error(`Error: expected a WAV, got ${type || "nothing"}`);
      }
      const blob = new Blob([await response.arrayBuffer()], { type: "audio/wav" });
      if (audioUrl) URL.revokeObjectURL(audioUrl);
      audioUrl = URL.createObjectURL(blob);
      player.src = audioUrl;
      say("Ready: press play to listen.");
      player.play().catch(() => { /* autoplay may be refused; the controls remain */ });
    } catch (e) {
      say(e.message, true);
    } finally {
      speak.disabled = false;
    }
  });
})();
