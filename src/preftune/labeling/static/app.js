// The annotator page. Model outputs are untrusted: they only ever reach the page through
// textContent, never innerHTML, so a response holding markup is shown as the text it is.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEYS = { "1": "left", "2": "right", t: "tie", b: "both_bad", s: "skip" };
  const LABELS = { left: "Left is better", right: "Right is better", tie: "Tie",
                   both_bad: "Both bad", skip: "Skip" };
  let current = null;  // { pair_id, key }: the pair on screen and the id of its vote
  let busy = false;    // one request at a time, so a held-down key votes once
  let toastTimer = null;

  // A random vote id made once per pair shown, reused on retries, so the server stores the
  // vote once. getRandomValues also works on plain-http pages, unlike randomUUID.
  function newKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function call(path, body) {
    const init = { credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      init.method = "POST";
      init.headers = { "Content-Type": "application/json" };
      init.body = JSON.stringify(body);
    }
    const res = await fetch(path, init);
    let data = {};
    try { data = await res.json(); } catch (e) { data = {}; }
    if (res.status === 401) showOnly("signed-out");
    return { ok: res.ok, status: res.status, data };
  }

  // Retry network failures a few times with the same body (same vote key): safe to replay.
  async function callWithRetry(path, body) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await call(path, body);
      } catch (e) {
        if (attempt >= 3) throw e;
        await new Promise((r) => setTimeout(r, 400 * 2 ** attempt));
      }
    }
  }

  function toast(text, isError) {
    const el = $("toast");
    el.textContent = text;
    el.classList.toggle("error", Boolean(isError));
    el.classList.add("show");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => el.classList.remove("show"), isError ? 4000 : 1200);
  }

  function showOnly(id) {
    for (const section of ["task", "finished", "signed-out"]) $(section).hidden = section !== id;
  }

  function element(tag, className, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function renderPrompt(prompt) {
    const box = $("prompt");
    box.replaceChildren();
    const turns = Array.isArray(prompt);
    box.classList.toggle("turns", turns);
    if (!turns) {
      box.append(element("div", "message", prompt));
      return;
    }
    for (const message of prompt) {
      const role = String(message.role).toLowerCase().replace(/[^a-z]/g, "");
      const wrap = element("div", "message role-" + role);
      wrap.append(element("div", "role", String(message.role)));
      wrap.append(element("div", "content", String(message.content)));
      box.append(wrap);
    }
    box.scrollTop = box.scrollHeight;  // the last turn is the one being answered
  }

  function renderProgress(progress) {
    const { done, remaining, total } = progress;
    const percent = total ? Math.round((100 * done) / total) : 100;
    $("progress-fill").style.width = percent + "%";
    $("progress-bar").setAttribute("aria-valuenow", String(percent));
    $("progress-text").textContent = `${done} done · ${remaining} left`;
  }

  function renderPair(pair) {
    current = { pair_id: pair.pair_id, key: newKey() };
    renderPrompt(pair.prompt);
    $("left").textContent = pair.left;
    $("right").textContent = pair.right;
    $("left").scrollTop = 0;
    $("right").scrollTop = 0;
    $("reason").value = "";
    for (const card of ["card-left", "card-right"]) $(card).classList.remove("picked");
    showOnly("task");
  }

  async function loadNext() {
    const { ok, data } = await callWithRetry("/api/next");
    if (!ok) return;
    $("annotator").textContent = data.annotator === "(open)" ? "" : data.annotator;
    renderProgress(data.progress);
    if (data.pair) {
      renderPair(data.pair);
    } else {
      current = null;
      showOnly("finished");
    }
  }

  function setBusy(value) {
    busy = value;
    for (const button of document.querySelectorAll("button.choice, #undo")) {
      button.disabled = value;
    }
  }

  function flash(choice) {
    const button = document.querySelector(`button[data-choice="${choice}"]`);
    if (button) button.classList.add("flash");
    const card = { left: "card-left", right: "card-right" }[choice];
    if (card) $(card).classList.add("picked");
    setTimeout(() => button && button.classList.remove("flash"), 250);
  }

  async function vote(choice) {
    if (busy || !current) return;
    setBusy(true);
    flash(choice);
    const body = { pair_id: current.pair_id, choice, key: current.key };
    const reason = $("reason").value.trim();
    if (reason) body.reason = reason;
    try {
      const { ok, data } = await callWithRetry("/api/vote", body);
      if (ok || data.already_saved) {
        toast("Saved: " + LABELS[choice]);
        await loadNext();
      } else if (data.error) {
        toast("Not saved: " + data.error, true);
      }
    } catch (e) {
      toast("Not saved: the server cannot be reached. Try again.", true);
    } finally {
      setBusy(false);
    }
  }

  async function undo() {
    if (busy) return;
    setBusy(true);
    try {
      const { ok, data } = await call("/api/undo", {});
      if (ok) {
        toast("Undone (" + LABELS[data.undone.choice] + "): vote again");
        await loadNext();
      } else if (data.error) {
        toast(data.error, true);
      }
    } catch (e) {
      toast("The server cannot be reached. Try again.", true);
    } finally {
      setBusy(false);
    }
  }

  function toggleGuidelines() {
    const panel = $("guidelines");
    panel.hidden = !panel.hidden;
    $("guidelines-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const typing = event.target instanceof HTMLTextAreaElement;
    if (typing) {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    const key = event.key.toLowerCase();
    if (KEYS[key]) {
      event.preventDefault();
      vote(KEYS[key]);
    } else if (key === "u") {
      event.preventDefault();
      undo();
    } else if (key === "g" || key === "?") {
      toggleGuidelines();
    }
  }

  async function start() {
    for (const button of document.querySelectorAll("button.choice")) {
      button.addEventListener("click", () => vote(button.dataset.choice));
    }
    $("undo").addEventListener("click", undo);
    $("guidelines-toggle").addEventListener("click", toggleGuidelines);
    document.addEventListener("keydown", onKey);
    const guidelines = await call("/api/guidelines");
    if (guidelines.ok) $("guidelines-text").textContent = guidelines.data.text;
    await loadNext();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
