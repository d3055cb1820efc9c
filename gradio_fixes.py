"""Fixes to Gradio's internals, each measured worth its risk (README, "How it works"), and
applied only to the Gradio version they were written for (WRITTEN_FOR, the version
requirements.txt pins). With any other version the app runs on stock Gradio and logs one
warning: a copied internal loop must never replace a newer one unseen.

    with gradio_app_built_at_launch_only():      # Gradio's app built once, at launch
        demo = build_demo(...); demo.queue(...)  # its chat: cache_history_postprocessing(gr.Chatbot(...))
    wake_queue_on_events(demo)                   # before demo.launch()
    patient_launch_check()                       # before demo.launch()
    refusals = UnqueuedRefusals()                # an unqueued event's gr.Error, shown
    refusals.shown(trigger(refusals.noting(fn), inputs, outputs, queue=False), outputs)
    raise Refusal(message, outputs=...)          # fn refuses, and the page shows these outputs
    state_now(demo, request, state, default)     # what a tab's gr.State holds now, not when the event began
    demo.load(None, js=keep_reading_js("chat"))  # scrolled up mid-answer, the reader stays there

The chatbot: every streamed update re-sends the whole chat, and Gradio postprocesses every
message of it again (Chatbot.postprocess builds pydantic models per message). A turn's
history messages are the same objects on every update, so each is postprocessed once.

The queue: Gradio's queue loop (queueing.Queue.start_processing) looks for work by sleeping
`sleep_when_free` (1 ms) and looking again, idle or not, and the CPU it burns is taken from
the model on the other core. Here it sleeps until an event is pushed or a job ends (an
asyncio.Event), with a slow poll as a safety net.

Reading above a streaming answer: Gradio 6.31's chatbot, at the bottom when an update comes,
scrolls to the bottom 300 ms later without looking again, and at ~30 updates a second one is
always due: a reader who scrolls up is pulled back down until the answer ends.
keep_reading_js makes the page skip those scrolls while the reader is above the bottom
(any way they got there: wheel, keys, touch, the scroll bar), and Gradio's "Scroll down"
button stays; back at the bottom, or with that button, it follows the answer again.

Refusals in unqueued events: Gradio 6.31's browser shows no message for a gr.Error raised
in an event with queue=False (the queued path shows it as a toast); it only marks the
event's outputs "Error", over the chat. UnqueuedRefusals tells it with public means (a
queued .failure() follow-up) and applies with any Gradio version: at worst a Gradio that
shows the message itself shows it twice. A Refusal also says what the outputs become (the
chat as it is now, when the page showed an old one); the follow-up sets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import threading
import time
from collections import OrderedDict

import gradio as gr

WRITTEN_FOR = "6.31.0"  # the Gradio whose internals these fixes replace
SAFETY_POLL_S = 0.5  # the loop also looks on its own this often, in case a wake-up was missed
CACHED_CHAT_MESSAGES = 4096  # postprocessed messages kept, across the chats streaming now
NOTED_REFUSALS = 1024  # refusals waiting to be shown (an API client's are never fetched)
LAUNCH_CHECK_S = 30.0  # how long launch() may ask its own server for the page before giving up

log = logging.getLogger("app")
_warned = False


def apply_fixes() -> bool:
    """True when the installed Gradio is the one these fixes were written for; otherwise
    False, after one warning (per process)."""
    global _warned
    if gr.__version__ == WRITTEN_FOR:
        return True
    if not _warned:
        _warned = True
        log.warning("Gradio %s is installed; this app's fixes to Gradio's internals were written for "
                    "%s, so it runs on stock Gradio (more CPU while idle and streaming).",
                    gr.__version__, WRITTEN_FOR)
    return False


def cache_history_postprocessing(chatbot: gr.Chatbot) -> gr.Chatbot:
    """Make `chatbot.postprocess` reuse its result for a message it has seen, the same
    object, in an earlier update: a turn's history messages are the same dicts on every
    update and are never changed in place; Gradio builds new models from the result and
    never changes it. New and changed messages (the answer streaming) are postprocessed
    as usual. On the instance, not a subclass: the browser knows a component by its class."""
    if not apply_fixes():
        return chatbot
    processed: OrderedDict[int, tuple[dict, list | None]] = OrderedDict()
    postprocess_message = chatbot._postprocess

    def postprocess(value):
        if value is None:
            return gr.components.chatbot.ChatbotDataMessages(root=[])
        chatbot._check_format(value)
        shown = []
        for message in value:
            if not isinstance(message, dict):
                messages = postprocess_message(message)
            elif (hit := processed.get(id(message))) is not None and hit[0] is message:
                processed.move_to_end(id(message))
                messages = hit[1]
            else:
                messages = postprocess_message(message)
                processed[id(message)] = (message, messages)  # holding it keeps its id unique
                if len(processed) > CACHED_CHAT_MESSAGES:
                    processed.popitem(last=False)
            if messages is not None:
                shown.extend(messages)
        return gr.components.chatbot.ChatbotDataMessages(root=shown)

    chatbot.postprocess = postprocess
    return chatbot


@contextlib.contextmanager
def gradio_app_built_at_launch_only():
    """Gradio builds its FastAPI app (~80 routes) on leaving each Blocks and in queue(),
    then again in launch(), whose app is the one served: the early ones are thrown away.
    Nothing reads `demo.app` before launch()."""
    if not apply_fixes():
        yield
        return
    from gradio.routes import App

    build = App.__dict__["create_app"]
    App.create_app = staticmethod(lambda blocks, *args, **kwargs: None)
    try:
        yield
    finally:
        App.create_app = build


def patient_launch_check() -> None:
    """launch() asks its own server for the page once (networking.url_ok: a HEAD with a 3 s
    time-out, no second try on a time-out) and otherwise refuses to start ("When localhost is
    not accessible, a shareable link must be created"): a machine busy loading a model, or a
    CI box running tests, can take longer. Ask again until LAUNCH_CHECK_S."""
    if not apply_fixes():
        return
    from gradio import networking
    if getattr(networking.url_ok, "patient", False):
        return
    ask_once = networking.url_ok

    def url_ok(url: str) -> bool:
        deadline = time.monotonic() + LAUNCH_CHECK_S
        while not ask_once(url):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    url_ok.patient = True
    networking.url_ok = url_ok


def wake_queue_on_events(demo) -> None:
    """Replace the polling in demo's queue loop with a wake-up (see the module docstring).
    Call after demo.queue() and before demo.launch(), which starts the loop."""
    if not apply_fixes():
        return
    from gradio.queueing import run_coro_in_background, set_task_name

    queue = demo._queue
    work = asyncio.Event()  # set: there may be an event to start
    push, process_events = queue.push, queue.process_events

    async def push_and_wake(*args, **kwargs):
        try:
            return await push(*args, **kwargs)
        finally:
            work.set()

    async def process_events_and_wake(*args, **kwargs):
        try:
            return await process_events(*args, **kwargs)
        finally:  # a concurrency slot is free: a waiting event may start
            work.set()

    async def wait_for_work():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(work.wait(), SAFETY_POLL_S)
        work.clear()  # before looking: a push from now on sets it again

    async def start_processing() -> None:
        # gradio 6.31 queueing.Queue.start_processing, with wait_for_work() in place of
        # `await asyncio.sleep(self.sleep_when_free)`.
        self = queue
        try:
            while not self.stopped:
                if len(self) == 0 or None not in self.active_jobs:
                    await wait_for_work()
                    continue
                async with self.delete_lock:
                    event_batch = self.get_events()
                if not event_batch:
                    await wait_for_work()
                    continue
                events, batch, concurrency_id = event_batch
                self.active_jobs[self.active_jobs.index(None)] = events
                event_queue = self.event_queue_per_concurrency_id[concurrency_id]
                event_queue.current_concurrency += 1
                start_time = time.time()
                fn = events[0].fn
                event_queue.start_times_per_fn[fn].add(start_time)
                for event in events:
                    if (a := self.event_analytics.get(event._id)) is not None:
                        a["status"] = "processing"
                task = run_coro_in_background(self.process_events, events, batch, start_time, fn)
                set_task_name(task, events[0].session_hash, fn._id, events[0]._id, batch)
                self._asyncio_tasks.add(task)
                task.add_done_callback(self._asyncio_tasks.discard)
                if self.live_updates:
                    self.broadcast_estimations(concurrency_id)
        finally:
            self.stopped = True
            self._cancel_asyncio_tasks()

    queue.push, queue.process_events = push_and_wake, process_events_and_wake
    queue.start_processing = start_processing
    # Its progress loop polls too (every 10 ms); the app reports no progress.
    queue.progress_update_sleep_when_free = 0.1


class Refusal(gr.Error):
    """A refusal of an unqueued event that also redraws: `outputs` are the event's outputs as
    its function returns them (a tuple for several), set by UnqueuedRefusals' follow-up."""

    def __init__(self, message: str, outputs):
        super().__init__(message)
        self.outputs = outputs


class UnqueuedRefusals:
    """Shows the gr.Error an unqueued event raises (see the module docstring): `noting(fn)`
    remembers the message for the page's session and raises it on (a gradio_client caller
    gets it as before, and .success() chains stop); `shown(event, outputs)` adds the queued
    follow-up that shows it as a warning toast and clears the "Error" mark on the outputs."""

    def __init__(self):
        self._notes: OrderedDict = OrderedDict()  # session hash -> the latest refusal's (message, outputs)
        self._lock = threading.Lock()

    def noting(self, fn):
        assert not (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)), "for instant events only"
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(*args, **kwargs):
                try:
                    return await fn(*args, **kwargs)
                except Exception as error:
                    self._note(error)
                    raise
            return run_async

        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                self._note(error)
                raise
        return run

    def _note(self, error: Exception) -> None:
        if isinstance(error, gr.Error):
            message = error.message
        else:  # (a bug of ours: Gradio hides its text from the page)
            message = "Something went wrong on the server (its log says what); the chat is as it was."
        session = _session()
        with self._lock:
            self._notes[session] = message, getattr(error, "outputs", None)
            self._notes.move_to_end(session)
            while len(self._notes) > NOTED_REFUSALS:
                self._notes.popitem(last=False)

    def shown(self, event, outputs: list):
        """`event` (its fn through noting) tells its refusals; returns the event."""
        count = len(outputs)

        def tell():
            with self._lock:
                message, outputs = self._notes.pop(_session(), (None, None))
            if message:
                gr.Warning(message)
            if outputs is not None:  # (a Refusal: what the page shows now)
                return outputs
            return gr.skip() if count == 1 else (gr.skip(),) * count

        event.failure(tell, None, outputs, show_progress="hidden", concurrency_limit=None,
                      api_visibility="undocumented")
        return event


def state_now(demo, request, state, default):
    """What `state` (a gr.State) holds now in the session of `request`: an event's inputs are
    read when it starts, and one that waits (end_turn, for a stopped answer's save) may find
    that another event of the tab has changed it meanwhile. `default` when there is no such
    session (a direct call) or this Gradio keeps sessions elsewhere."""
    holder, session = getattr(demo, "state_holder", None), getattr(request, "session_hash", None)
    try:
        if holder is None or session is None or session not in holder:
            return default
        return holder[session][state._id]
    except (AttributeError, KeyError, TypeError):
        return default


def keep_reading_js(elem_id: str) -> str:
    """The page script (a demo.load js) that keeps a reader scrolled up in the chatbot
    `elem_id` where they are while an answer streams (the module docstring)."""
    return """() => {
  if (window.keepReadingInstalled) return;
  window.keepReadingInstalled = true;
  const CHAT = '#%s .bubble-wrap, #%s .panel-wrap';
  const atBottom = (el) => el.scrollHeight - el.scrollTop - el.clientHeight < 30;
  let readingAbove = false;
  // Only the reader scrolls the chat up (the chatbot's own scrolls go to the bottom).
  document.addEventListener('scroll', (event) => {
    if (event.target instanceof Element && event.target.matches(CHAT)) readingAbove = !atBottom(event.target);
  }, true);
  document.addEventListener('click', (event) => {  // Gradio's "Scroll down" button
    if (event.target instanceof Element && event.target.closest('.scroll-down-button-container')) readingAbove = false;
  }, true);
  const scrollTo = Element.prototype.scrollTo;
  Element.prototype.scrollTo = function (...where) {
    if (readingAbove && this.matches(CHAT)) {  // (then the chatbot hides its "Scroll down" button:
      queueMicrotask(() => this.dispatchEvent(new Event('scroll')));  // told it is not at the bottom, it shows it)
      return;
    }
    return scrollTo.apply(this, where);
  };
}""" % (elem_id, elem_id)


def _session() -> str | None:
    """The page (session) the event in progress came from."""
    try:
        from gradio.context import LocalContext
        request = LocalContext.request.get(None)
    except (ImportError, AttributeError):
        return None
    return getattr(request, "session_hash", None)
