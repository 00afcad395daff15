// The annotator page. Model outputs are untrusted: they only ever reach the page through
// textContent, never innerHTML, so a response holding markup is shown as the text it is.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEYS = { "1": "left", "2": "right", t: "tie", b: "both_bad", s: "skip" };
  const LABELS = { left: "Left is better", right: "Right is better", tie: "Tie",
                   both_bad: "Both bad", skip: "Skip" };
  const HEALTH_POLL_MS = 2000;
  const MAX_REASON = 2000;  // characters, as the server counts them (code points)
  // A new pair takes votes only once it has been on screen this long. The next pair is shown
  // within milliseconds of a vote's answer, so a key pressed twice by accident (about 100-250
  // ms apart) voted on a pair nobody had read. 400 ms is above such double presses and far
  // below any real reading time (even seeing that the pair changed and choosing takes about
  // half a second), so no deliberate vote is held back by it.
  const READ_AT_LEAST_MS = 400;
  // A request unanswered this long is given up. A server that took the connection and never
  // answers (a hung proxy, a machine asleep behind a tunnel) left a vote waiting forever. It
  // must stay above the longest a healthy server may take: a write waits up to 30 s for a
  // labels database locked by another process (busy_timeout=30000 in labeling/store.py).
  const ANSWER_TIMEOUT_MS = 45000;
  let current = null;  // { pair_id, key }: the pair on screen and the id of its vote
  let busy = false;    // one request at a time, so a double click or a held key votes once
  let annotator = null;  // the name this page was opened as
  let toastTimer = null;
  let readyTimer = null;
  let healthTimer = null;

  // A random vote id made once per pair shown, reused on retries, so the server stores the
  // vote once. getRandomValues also works on plain-http pages, unlike randomUUID.
  function newKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // Thrown by `call` when the server took the request but gave no answer in ANSWER_TIMEOUT_MS.
  class NoAnswer extends Error {}

  async function call(path, body) {
    const init = { credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      init.method = "POST";
      init.headers = { "Content-Type": "application/json" };
      init.body = JSON.stringify(body);
    }
    const controller = new AbortController();
    init.signal = controller.signal;
    const timer = setTimeout(() => controller.abort(), ANSWER_TIMEOUT_MS);
    let res, text;
    try {
      res = await fetch(path, init);
      text = await res.text();  // the body too: a server may stop halfway through it
    } catch (e) {
      throw controller.signal.aborted ? new NoAnswer() : e;
    } finally {
      clearTimeout(timer);
    }
    let data = {};
    try { data = JSON.parse(text); } catch (e) { data = {}; }
    if (res.status === 401) showOnly("signed-out");
    return { ok: res.ok, status: res.status, data };
  }

  // Retry network failures a few times with the same body (same vote key): safe to replay.
  // A request left unanswered is not retried here: it has waited ANSWER_TIMEOUT_MS already,
  // and the annotator is told at once instead of after minutes more.
  async function callWithRetry(path, body) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await call(path, body);
      } catch (e) {
        if (e instanceof NoAnswer || attempt >= 3) throw e;
        if (attempt === 0) showBanner("The server does not answer; trying again…");
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
    toastTimer = setTimeout(() => el.classList.remove("show"), isError ? 6000 : 1500);
  }

  // The banner holds what stays true until the annotator acts: the server is unreachable,
  // a vote is not saved, the browser signed in as someone else. Toasts fade; this does not.
  function showBanner(text) {
    $("banner").textContent = text;
    $("banner").hidden = false;
  }

  function clearBanner() {
    $("banner").hidden = true;
    $("banner").textContent = "";
  }

  // The server cannot be reached: say so until it answers /healthz again, then either say
  // `backText` or run `whenBack` (which clears the banner).
  function serverDown(text, backText, whenBack) {
    showBanner(text);
    clearInterval(healthTimer);
    healthTimer = setInterval(async () => {
      try {
        if (!(await fetch("/healthz", { cache: "no-store" })).ok) return;
      } catch (e) {
        return;
      }
      clearInterval(healthTimer);
      healthTimer = null;
      if (whenBack) {
        clearBanner();
        await whenBack();
      } else {
        showBanner(backText);
      }
    }, HEALTH_POLL_MS);
  }

  function serverUp() {
    clearInterval(healthTimer);
    healthTimer = null;
    const sticky = $("banner").dataset.sticky;
    if (sticky) showBanner(sticky); else clearBanner();
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
      showText(box.appendChild(element("div", "message")), prompt);
      return;
    }
    for (const message of prompt) {
      const role = String(message.role).toLowerCase().replace(/[^a-z]/g, "");
      const wrap = element("div", "message role-" + role);
      wrap.append(element("div", "role", String(message.role)));
      showText(wrap.appendChild(element("div", "content")), String(message.content));
      box.append(wrap);
    }
  }

  // Invisible controls that reorder the text around them (embeddings, overrides, isolates):
  // "\u202eevil\u202c" would read "live". Shown as visible marks so that the annotator sees
  // the characters in the order the model wrote them; the stored text is not touched.
  // LRM and RLM (U+200E, U+200F) are left alone: common in right-to-left text, they only
  // place neutral characters such as punctuation.
  const BIDI_CONTROL = /[\u202A-\u202E\u2066-\u2069]/g;

  // `text` in `box` (replacing what it held), each direction control as a visible mark; the
  // number of controls found.
  function showText(box, text) {
    const parts = [];
    let last = 0;
    for (const match of text.matchAll(BIDI_CONTROL)) {
      parts.push(text.slice(last, match.index));
      const code = match[0].codePointAt(0).toString(16).toUpperCase();
      parts.push(element("span", "bidi-mark", `⟨U+${code}⟩`));
      last = match.index + 1;
    }
    parts.push(text.slice(last));
    box.replaceChildren(...parts);  // strings become text nodes: never parsed as markup
    return (parts.length - 1) / 2;
  }

  // A response that is empty or only whitespace would look like a page still loading.
  function renderResponse(box, text, note) {
    const blank = !text.trim();
    box.classList.toggle("blank", blank);
    let controls = 0;
    if (blank) {
      box.replaceChildren(element("span", "blank-note",
        text ? "(this response is only whitespace)" : "(this response is empty)"));
    } else {
      controls = showText(box, text);
    }
    note.hidden = !controls;
    note.textContent = controls === 1
      ? "This response holds 1 invisible text-direction control, shown as ⟨U+…⟩."
      : `This response holds ${controls} invisible text-direction controls, shown as ⟨U+…⟩.`;
    box.scrollTop = 0;
  }

  function renderProgress(progress) {
    const { done, remaining, total } = progress;
    const percent = total ? Math.round((100 * done) / total) : 100;
    $("progress-fill").style.width = percent + "%";
    $("progress-bar").setAttribute("aria-valuenow", String(percent));
    $("progress-text").textContent = `${done} done · ${remaining} left`;
  }

  // Reasons typed but not sent, by pair id. An undo puts the previous pair on screen; the
  // reason being written for the pair it replaces waits here until that pair comes back.
  const drafts = new Map();

  function swapDraft(nextPairId) {
    const text = $("reason").value;
    if (current && text.trim()) drafts.set(current.pair_id, text);
    $("reason").value = drafts.get(nextPairId) || "";
    drafts.delete(nextPairId);
  }

  // #task carries data-pair-ready once the pair on screen takes votes (see READ_AT_LEAST_MS);
  // tests wait on it before voting.
  function holdVotes() {
    delete $("task").dataset.pairReady;
    clearTimeout(readyTimer);
    readyTimer = setTimeout(() => { $("task").dataset.pairReady = "true"; }, READ_AT_LEAST_MS);
  }

  function renderPair(pair) {
    const samePair = current && current.pair_id === pair.pair_id;
    if (!samePair) {
      swapDraft(pair.pair_id);
      holdVotes();  // the same pair again (a retry after an error) was read already
    }
    current = { pair_id: pair.pair_id, key: newKey() };
    renderPrompt(pair.prompt);
    renderResponse($("left"), pair.left, $("left-bidi"));
    renderResponse($("right"), pair.right, $("right-bidi"));
    $("left-cut").hidden = !pair.left_truncated;
    $("right-cut").hidden = !pair.right_truncated;
    $("identical").hidden = pair.left !== pair.right;
    showReasonLimit();
    unpick();
    showOnly("task");
    // A conversation opens at its last turn, the one being answered; a text at its start.
    // Scrolled once shown: a hidden box (the first pair's, or after the end) has no height to
    // scroll, and a conversation stayed at its first turn.
    const prompt = $("prompt");
    prompt.scrollTop = prompt.classList.contains("turns") ? prompt.scrollHeight : 0;
    // A new pair starts at its prompt, not where the last one was scrolled to.
    if (!samePair) window.scrollTo(0, 0);
  }

  function renderFinished(waiting) {
    current = null;
    const note = $("waiting");
    note.hidden = !waiting;
    note.textContent = waiting === 1
      ? "1 more pair is being labelled by another annotator right now; it comes back to you " +
        "if it is left unanswered, so check again in a while."
      : `${waiting} more pairs are being labelled by other annotators right now; those left ` +
        "unanswered come back to you, so check again in a while.";
    showOnly("finished");
  }

  function noticeSignIn(name) {
    if (annotator !== null && name !== annotator) {
      const shown = (n) => (n === "(open)" ? "the anonymous annotator" : n);
      showBanner(`This page now votes as ${shown(name)}, not ${shown(annotator)}: another ` +
                 "login link was opened in this browser; open your own link again to vote as " +
                 "yourself.");
      $("banner").dataset.sticky = $("banner").textContent;
    }
    annotator = name;
    $("annotator").textContent = name === "(open)" ? "" : name;
  }

  // Show the annotator's next pair (or the end); false when that failed, with the reason shown.
  async function loadNext() {
    let result;
    try {
      result = await callWithRetry("/api/next");
    } catch (e) {
      current = null;
      serverDown("The server cannot be reached, so the next pair cannot be loaded; this page " +
                 "loads it as soon as the server is back.", null, loadNext);
      return false;
    }
    const { ok, status, data } = result;
    serverUp();  // it answered, even if with an error
    if (!ok) {
      if (status !== 401) {
        showBanner(`The next pair could not be loaded (${data.error || "error " + status}); ` +
                   "reload the page to try again.");
      }
      return false;
    }
    noticeSignIn(data.annotator);
    renderProgress(data.progress);
    if (data.pair) {
      renderPair(data.pair);
    } else {
      renderFinished(data.waiting || 0);
    }
    return true;
  }

  function setBusy(value) {
    busy = value;
    // aria-disabled, not disabled: a disabled button loses keyboard focus, and a keyboard
    // user would be thrown back to the top of the page after every vote.
    for (const button of document.querySelectorAll("button.choice, #undo, #finished-undo")) {
      button.setAttribute("aria-disabled", String(value));
    }
  }

  function unpick() {
    for (const card of ["card-left", "card-right"]) $(card).classList.remove("picked");
  }

  function flash(choice) {
    const button = document.querySelector(`button[data-choice="${choice}"]`);
    if (button) button.classList.add("flash");
    const card = { left: "card-left", right: "card-right" }[choice];
    if (card) $(card).classList.add("picked");
    setTimeout(() => button && button.classList.remove("flash"), 250);
  }

  // The reason's length problem in one sentence, or "" when it fits.
  function reasonProblem() {
    const length = [...$("reason").value.trim()].length;
    return length > MAX_REASON
      ? `The reason is ${length} characters long; shorten it to ${MAX_REASON} to save the vote.`
      : "";
  }

  function showReasonLimit() {
    const problem = reasonProblem();
    $("reason-limit").textContent = problem;
    $("reason-limit").hidden = !problem;
  }

  // Ids of the votes this page saved, newest last: undo names the one it means, so an undo
  // retried after its answer was lost cannot withdraw a second, older vote.
  const savedVotes = [];

  async function vote(choice) {
    if (busy || !current) return;
    // A key or click on a pair just shown is ignored (see READ_AT_LEAST_MS), silently, like a
    // held key or the second click of a double click: the page has no cue for an ignored
    // press, a toast would replace the "Saved: ..." of the vote that counted, and the pair on
    // screen shows no vote.
    if (!$("task").dataset.pairReady) return;
    if (reasonProblem()) {
      toast("Not saved: " + reasonProblem(), true);
      return;
    }
    setBusy(true);
    flash(choice);
    const body = { pair_id: current.pair_id, choice, key: current.key };
    const reason = $("reason").value.trim();
    if (reason) body.reason = reason;
    try {
      let result;
      try {
        result = await callWithRetry("/api/vote", body);
      } catch (e) {
        unpick();
        if (e instanceof NoAnswer) {
          // The vote may or may not have been saved. The pair and its vote key stay, so one
          // press retries, and a vote the server did save answers "already saved" (stored once).
          showBanner("Your vote is not confirmed: the server has not answered for " +
                     `${ANSWER_TIMEOUT_MS / 1000} s. Press your choice again; that is safe (a ` +
                     "vote the server did save is stored once).");
          return;
        }
        serverDown("Your vote is NOT saved: the server cannot be reached. Vote again once it " +
                   "is back (it is stored once, however often you press).",
                   "The server is back: vote again to save this pair.");
        return;
      }
      const { ok, data } = result;
      serverUp();
      if (ok || data.already_saved) {
        if (Number.isInteger(data.vote_id) && !savedVotes.includes(data.vote_id)) {
          savedVotes.push(data.vote_id);
        }
        // After a lost answer the stored choice may differ from this retry's: name the stored.
        toast("Saved: " + LABELS[data.choice || choice]);
        $("reason").value = "";  // sent with the vote: no draft left for this pair
        await loadNext();
      } else if (data.stale) {
        toast("Not saved: this pair was already answered (in another tab?); here is your " +
              "next pair.", true);
        await loadNext();
      } else if (result.status !== 401) {
        // In the banner, not a toast: a toast fades while the annotator reads on, and a
        // refusal such as a full disk (503) holds until someone acts. The pair and its vote
        // key stay, so pressing the choice again retries and the vote is stored once.
        unpick();
        showBanner("Not saved: " + (data.error || `the server answered ${result.status}.`));
      }
    } finally {
      setBusy(false);
    }
  }

  async function undo() {
    if (busy) return;
    setBusy(true);
    // The newest vote this page saved; after a reload it knows none, and the server takes
    // the annotator's newest.
    const voteId = savedVotes.length ? savedVotes[savedVotes.length - 1] : null;
    try {
      let result;
      try {
        result = await call("/api/undo", voteId === null ? {} : { vote_id: voteId });
      } catch (e) {
        // The undo may have reached the server and only its answer been lost: pressing u
        // again names the same vote, so it is withdrawn once either way.
        serverDown("Undo not confirmed: the server cannot be reached. Press u again once it " +
                   "is back.", "The server is back: press u again to undo.");
        return;
      }
      const { ok, status, data } = result;
      serverUp();
      if (voteId !== null && (ok || status === 409)) savedVotes.pop();
      if (!ok && status === 409 && voteId !== null) {
        // Already withdrawn: by an undo whose answer was lost, or in another tab.
        toast("That vote was already undone; vote again.");
        await loadNext();
      } else if (ok) {
        const undone = data.undone;
        toast(`Undone: your “${LABELS[undone.choice]}” on this pair; vote again.`);
        if (await loadNext() && current && current.pair_id === undone.pair_id && undone.reason) {
          $("reason").value = undone.reason;
          showReasonLimit();
        }
      } else if (status >= 500) {
        // A refusal that holds until someone acts (a full disk): in the banner, like a vote's.
        showBanner("Not undone: " + (data.error || `the server answered ${status}.`));
      } else if (status !== 401) {
        toast(data.error || `Nothing was undone: the server answered ${status}.`, true);
      }
    } finally {
      setBusy(false);
    }
  }

  async function checkAgain() {
    if (busy) return;
    setBusy(true);
    try {
      await loadNext();
      if (!current && $("banner").hidden) toast("Still nothing new for you.");
    } finally {
      setBusy(false);
    }
  }

  function toggleGuidelines() {
    const panel = $("guidelines");
    panel.hidden = !panel.hidden;
    $("guidelines-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  }

  // The shortcut a key press means. On a Hebrew, Arabic or Russian layout the T key types
  // "א", "ف" or "е", and on a French one the 1 key types "&": those fall back to the key's
  // place on the keyboard, so that annotators of such text need not switch layouts. A Latin
  // letter is taken as typed (on Dvorak, the key typing "t" is tie).
  function shortcutOf(event) {
    const key = event.key.toLowerCase();
    if (KEYS[key] || key === "u" || key === "g" || key === "?") return key;
    const digit = /^Digit([12])$/.exec(event.code || "");
    if (digit && !event.shiftKey) return digit[1];
    const letter = /^Key([TBSUG])$/.exec(event.code || "");
    if (letter && key.length === 1 && key > "\u007f") return letter[1].toLowerCase();
    return key;
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const target = event.target;
    const typing = target instanceof Element &&
      target.closest("textarea, input, select, [contenteditable]") !== null;
    if (typing) {
      if (event.key === "Escape") target.blur();
      return;
    }
    const key = shortcutOf(event);
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

  // A click that is the second (or third) of a double click is ignored: the next pair is on
  // screen within a few milliseconds of the first, and the second click would vote on (or
  // undo) a pair the annotator has not read. Keys and Enter on a button give detail 0.
  function singleClick(action) {
    return (event) => {
      if (event.detail > 1) return;
      // A mouse click leaves the focus on the button, where Space, pressed to scroll down the
      // next pair, would press the button again: a vote on that unread pair. A press from the
      // keyboard (detail 0) keeps the focus, so a Tab-and-Enter user stays on the button.
      if (event.detail === 1) event.currentTarget.blur();
      action();
    };
  }

  async function start() {
    for (const button of document.querySelectorAll("button.choice")) {
      button.addEventListener("click", singleClick(() => vote(button.dataset.choice)));
    }
    $("undo").addEventListener("click", singleClick(undo));
    $("finished-undo").addEventListener("click", singleClick(undo));
    $("check-again").addEventListener("click", checkAgain);
    $("reason").addEventListener("input", showReasonLimit);
    $("guidelines-toggle").addEventListener("click", toggleGuidelines);
    document.addEventListener("keydown", onKey);
    try {
      const guidelines = await call("/api/guidelines");
      if (guidelines.ok) $("guidelines-text").textContent = guidelines.data.text;
    } catch (e) {
      // loadNext says that the server cannot be reached.
    }
    await loadNext();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
