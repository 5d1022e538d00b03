// The try-it page's script (privox/api/static/index.html): record and
// transcribe through /stt; live captions over the /v1/realtime WebSocket;
// type and hear through /v1/audio/speech, played as it arrives (/tts where
// the browser cannot stream). No framework.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const key = $("key"), status = $("status"), player = $("player");
  const record = $("record"), stop = $("stop"), speak = $("speak");
  const live = $("live"), captions = $("captions");
  const AudioContextClass = window.AudioContext || window.webkitAudioContext;
  let recorder = null, chunks = [], audioUrl = null, session = null;

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

  // -- Speech to text: a recording, transcribed when it is done ------------

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

  // -- Live captions: the microphone as 16 kHz PCM over a WebSocket --------

  // The audio thread hands each block of samples to the page.
  const TAP = `registerProcessor("privox-tap", class extends AudioWorkletProcessor {
    process(inputs) {
      if (inputs[0] && inputs[0][0]) this.port.postMessage(inputs[0][0].slice(0));
      return true;
    }
  });`;
  const RATE = 16000;
  // What is sent at a time: 100 ms, as OpenAI's examples send.
  const CHUNK = RATE / 10;
  // Audio kept while the socket opens, at most (then the oldest goes).
  const KEEP = RATE * 10;

  // Samples at the microphone's rate to 16 kHz: each output sample the
  // mean of the input samples it covers (a box filter, enough for speech).
  function downsampler(rate) {
    const step = rate / RATE;
    let next = step, index = 0, sum = 0, count = 0;
    return (input) => {
      const out = [];
      for (let i = 0; i < input.length; i++) {
        sum += input[i];
        count += 1;
        index += 1;
        if (index >= next) {
          out.push(sum / count);
          sum = 0;
          count = 0;
          next += step;
        }
      }
      return out;
    };
  }

  function base64(bytes) {
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(text);
  }

  function send(s, event) {
    if (s.socket.readyState === WebSocket.OPEN) s.socket.send(JSON.stringify(event));
  }

  // Whole 100 ms chunks go out as they fill; with `all`, the rest too.
  function flush(s, all) {
    if (s.socket.readyState !== WebSocket.OPEN || !s.ready) return;
    while (s.samples.length >= CHUNK || (all && s.samples.length)) {
      const part = s.samples.splice(0, CHUNK);
      const pcm = new Int16Array(part.length);
      for (let i = 0; i < part.length; i++) {
        const x = Math.max(-1, Math.min(1, part[i]));
        pcm[i] = x < 0 ? x * 32768 : x * 32767;
      }
      send(s, { type: "input_audio_buffer.append", audio: base64(new Uint8Array(pcm.buffer)) });
    }
  }

  function heard(s, samples) {
    if (s.stopping) return;
    for (const x of samples) s.samples.push(x);
    if (s.samples.length > KEEP) s.samples.splice(0, s.samples.length - KEEP);
    flush(s, false);
  }

  // One line an utterance: grey while it is heard, black once final.
  function caption(s, item, text, final) {
    let line = s.lines.get(item);
    if (!line) {
      line = document.createElement("p");
      captions.append(line);
      s.lines.set(item, line);
    }
    if (final && !text.trim()) {
      line.remove();
      s.lines.delete(item);
      return;
    }
    line.textContent = text;
    line.className = final ? "final" : "partial";
    captions.scrollTop = captions.scrollHeight;
  }

  function onEvent(s, event) {
    s.lastEvent = performance.now();
    switch (event.type) {
      case "transcription_session.updated": {
        const model = event.session.privox_model || event.session.input_audio_transcription.model;
        s.ready = true;
        flush(s, false);
        if (!s.stopping) say(`Listening: captions by ${model}. Press Stop when you are done.`);
        break;
      }
      case "conversation.item.input_audio_transcription.delta": {
        const line = s.lines.get(event.item_id);
        const text = event.text !== undefined ? event.text : (line ? line.textContent : "") + event.delta;
        caption(s, event.item_id, text, false);
        break;
      }
      case "conversation.item.input_audio_transcription.completed":
        caption(s, event.item_id, event.transcript, true);
        break;
      case "error":
        s.failed = true;
        say(`Error: ${event.error.message}`, true);
        finish(s);
        break;
      default:
        break;
    }
  }

  // The microphone and the audio graph let go.
  function release(s) {
    s.stream.getTracks().forEach((track) => track.stop());
    if (s.node) s.node.disconnect();
    if (s.source) s.source.disconnect();
    s.context.close().catch(() => { /* already closed */ });
  }

  function finish(s) {
    s.stopping = true;
    release(s);
    clearInterval(s.timer);
    if (s.socket.readyState <= WebSocket.OPEN) s.socket.close(1000);
  }

  function closed(s, event) {
    if (!s.stopping && !s.failed) {
      say(`Live captions ended: ${event.reason || "the connection closed"} (${event.code}).`, true);
    } else if (!s.failed) {
      say("Live captions stopped.");
    }
    s.stopping = true;
    release(s);
    clearInterval(s.timer);
    if (session === s) session = null;
    live.textContent = "Start";
    live.setAttribute("aria-pressed", "false");
    live.disabled = false;
  }

  async function startLive() {
    if (!window.WebSocket || !AudioContextClass || !navigator.mediaDevices) {
      return say("This browser cannot caption live (no WebSocket or Web Audio).", true);
    }
    // Made in the click, so that the browser lets it run.
    const context = new AudioContextClass();
    live.disabled = true;
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
      });
    } catch (e) {
      context.close();
      live.disabled = false;
      return say(`No microphone: ${e.message || e.name}`, true);
    }
    captions.textContent = "";
    const s = session = {
      context, stream, lines: new Map(), samples: [], ready: false, stopping: false,
      failed: false, node: null, source: null, timer: null, lastEvent: performance.now(),
    };
    const protocols = ["realtime"];
    if (key.value.trim()) protocols.push("openai-insecure-api-key." + key.value.trim());
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    s.socket = new WebSocket(`${scheme}//${location.host}/v1/realtime?intent=transcription`, protocols);
    s.socket.onopen = () => send(s, {
      type: "transcription_session.update",
      session: {
        input_audio_format: "pcm16",
        input_audio_rate: RATE,
        input_audio_transcription: { model: $("quality").value, language: $("language").value },
      },
    });
    s.socket.onmessage = (message) => {
      let event;
      try { event = JSON.parse(message.data); } catch (e) { return; }
      onEvent(s, event);
    };
    s.socket.onclose = (event) => closed(s, event);

    try {
      s.source = context.createMediaStreamSource(stream);
      const down = downsampler(context.sampleRate);
      if (context.audioWorklet && window.AudioWorkletNode) {
        const url = URL.createObjectURL(new Blob([TAP], { type: "text/javascript" }));
        await context.audioWorklet.addModule(url);
        URL.revokeObjectURL(url);
        s.node = new AudioWorkletNode(context, "privox-tap");
        s.node.port.onmessage = (message) => heard(s, down(message.data));
      } else {
        s.node = context.createScriptProcessor(4096, 1, 1);
        s.node.onaudioprocess = (e) => heard(s, down(e.inputBuffer.getChannelData(0)));
      }
      // Its output is silence; connected, so that the browser runs it.
      s.source.connect(s.node);
      s.node.connect(context.destination);
      await context.resume();
    } catch (e) {
      if (s.stopping) return; // the session ended (an error, say) meanwhile
      s.failed = true;
      say(`No live audio: ${e.message || e.name}`, true);
      return finish(s);
    }
    if (s.stopping) return;
    live.textContent = "Stop";
    live.setAttribute("aria-pressed", "true");
    live.disabled = false;
    if (!s.ready) say("Connecting…");
  }

  // Stop: the microphone is let go, the rest of its audio sent and
  // committed; the socket closes once the last captions are final (or
  // after 15 s).
  function stopLive(s) {
    s.stopping = true;
    release(s);
    flush(s, true);
    send(s, { type: "input_audio_buffer.commit" });
    live.disabled = true;
    live.textContent = "Finishing…";
    say("Finishing the last captions…");
    const stopped = performance.now();
    s.timer = setInterval(() => {
      const now = performance.now();
      const open = captions.querySelector(".partial") !== null;
      if ((!open && now - s.lastEvent > 1000 && now - stopped > 1000) || now - stopped > 15000) {
        finish(s);
      }
    }, 250);
  }

  live.addEventListener("click", () => {
    if (session) {
      if (!session.stopping) stopLive(session);
    } else {
      startLive();
    }
  });

  // -- Text to speech: played as it arrives ---------------------------------

  function wavBlob(parts, samples, rate) {
    const header = new DataView(new ArrayBuffer(44));
    const text = (at, value) => { for (let i = 0; i < value.length; i++) header.setUint8(at + i, value.charCodeAt(i)); };
    text(0, "RIFF");
    header.setUint32(4, 36 + samples * 2, true);
    text(8, "WAVE");
    text(12, "fmt ");
    header.setUint32(16, 16, true);
    header.setUint16(20, 1, true);
    header.setUint16(22, 1, true);
    header.setUint32(24, rate, true);
    header.setUint32(28, rate * 2, true);
    header.setUint16(32, 2, true);
    header.setUint16(34, 16, true);
    text(36, "data");
    header.setUint32(40, samples * 2, true);
    return new Blob([header, ...parts], { type: "audio/wav" });
  }

  function show(blob) {
    if (audioUrl) URL.revokeObjectURL(audioUrl);
    audioUrl = URL.createObjectURL(blob);
    player.src = audioUrl;
  }

  // /v1/audio/speech as raw 24 kHz PCM, each piece played as it comes;
  // then the whole of it in the player, to hear again.
  async function speakStreaming(text) {
    const context = new AudioContextClass();
    const headers = { "Content-Type": "application/json" };
    if (key.value.trim()) headers.Authorization = `Bearer ${key.value.trim()}`;
    const asked = performance.now();
    let response;
    try {
      response = await fetch("/v1/audio/speech", {
        method: "POST",
        headers,
        body: JSON.stringify({ model: "tts-1", voice: $("voice").value, input: text, response_format: "pcm" }),
      });
      if (!response.ok) throw new Error(await failure(response));
    } catch (e) {
      context.close();
      throw e;
    }
    const rate = 24000, reader = response.body.getReader(), parts = [];
    let carry = null, samples = 0, playAt = 0, first = null;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      let bytes = value;
      if (carry) {
        bytes = new Uint8Array(carry.length + value.length);
        bytes.set(carry);
        bytes.set(value, carry.length);
      }
      const whole = bytes.length - (bytes.length % 2);
      carry = whole < bytes.length ? bytes.slice(whole) : null;
      if (!whole) continue;
      const pcm = new Int16Array(bytes.slice(0, whole).buffer);
      parts.push(pcm);
      samples += pcm.length;
      const buffer = context.createBuffer(1, pcm.length, rate);
      const channel = buffer.getChannelData(0);
      for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32768;
      const node = context.createBufferSource();
      node.buffer = buffer;
      node.connect(context.destination);
      playAt = Math.max(playAt, context.currentTime + 0.05);
      node.start(playAt);
      playAt += buffer.duration;
      if (first === null) {
        first = (performance.now() - asked) / 1000;
        say(`Playing as it arrives (first sound after ${first.toFixed(2)} s)…`);
      }
    }
    if (!samples) {
      context.close();
      throw new Error("Error: no audio came back");
    }
    show(wavBlob(parts, samples, rate));
    say(`Spoke ${(samples / rate).toFixed(1)} s as it arrived (first sound after ${first.toFixed(2)} s); press play to hear it again.`);
    setTimeout(() => context.close(), Math.max(0, playAt - context.currentTime) * 1000 + 500);
  }

  // The whole WAV from /tts, where the browser cannot stream.
  async function speakWhole(text) {
    const form = new FormData();
    form.append("text", text);
    form.append("voice", $("voice").value);
    const response = await post("/tts", form, "audio/wav");
    // /tts answers audio/x-wav, as the original did; either name is a WAV.
    const type = (response.headers.get("Content-Type") || "").split(";")[0].trim();
    if (type !== "audio/wav" && type !== "audio/x-wav") {
      throw new Error(`Error: expected a WAV, got ${type || "nothing"}`);
    }
    show(new Blob([await response.arrayBuffer()], { type: "audio/wav" }));
    say("Ready: press play to listen.");
    player.play().catch(() => { /* autoplay may be refused; the controls remain */ });
  }

  const canStream = Boolean(AudioContextClass && window.ReadableStream && window.Response
    && "body" in Response.prototype);

  speak.addEventListener("click", async () => {
    const text = $("tts-text").value.trim();
    if (!text) return say("Type something to speak first.", true);
    speak.disabled = true;
    say("Speaking…");
    try {
      await (canStream ? speakStreaming(text) : speakWhole(text));
    } catch (e) {
      say(e.message, true);
    } finally {
      speak.disabled = false;
    }
  });
})();
