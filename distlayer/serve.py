"""``distlayer serve``: an OpenAI-compatible HTTP server over a model's :class:`Scheduler`.

Built on aiohttp: it is already installed with ``ray[default]`` (no new dependency),
well kept, and serves streamed responses (server-sent events) with a clean way to see a
client go away (a write to a closed connection fails), which is what cancels a request.

Endpoints: ``POST /v1/chat/completions`` (the chat template applied), ``POST
/v1/completions``, each with ``stream`` true or false; ``GET /v1/models``; ``GET /health``
(every stage answers); ``GET /metrics`` (Prometheus' text format: see ``metrics.py``).
Errors are OpenAI-style JSON: 400 (a bad request), 401 (no or a wrong API key), 404
(unknown model or path), 413 (longer than the context), 503 (a stage died, named).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

from aiohttp import web

from .config import GenerationConfig, temperature_settings
from .errors import ConfigError, DistlayerError, StageError
from .generate import cut_at_stop
from .metrics import render, server_registry
from .prompts import NoChatTemplate, context_error, messages_error, tokenize

CHUNK_TYPES = {"chat": "chat.completion.chunk", "text": "text_completion"}


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> web.Response:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_error"}.get(
            self.status, "invalid_request_error")
        return web.json_response({"error": {"message": str(self), "type": kind, "param": self.param,
                                            "code": self.code}}, status=self.status)


def _field(body: dict, name: str, kinds, check=None, want: str = "", default=None):
    """``body[name]`` if it has one of ``kinds`` (bools are not numbers) and passes ``check``."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(400, f"{name}: got {value!r}; {want}", name)
    if not isinstance(value, kinds) or (check is not None and not check(value)):
        raise BadRequest(400, f"{name}: got {value!r}; {want}", name)
    return value


def generation_settings(body: dict, model) -> GenerationConfig:
    """The request's OpenAI fields as resolved generation settings.

    ``temperature`` 0 is greedy; any other temperature samples; left out, the model's own
    generation config decides (as vLLM does).
    """
    max_tokens = _field(body, "max_tokens", int, lambda v: v >= 1, "use a whole number of 1 or more", None)
    max_tokens = _field(body, "max_completion_tokens", int, lambda v: v >= 1, "use a whole number of 1 or more",
                        max_tokens)
    temperature = _field(body, "temperature", (int, float), lambda v: 0 <= v <= 2, "use a number from 0 to 2")
    top_p = _field(body, "top_p", (int, float), lambda v: 0 < v <= 1, "use a number in (0, 1]")
    seed = _field(body, "seed", int, None, "use a whole number")
    stop = body.get("stop")  # a text or a list of texts, checked as GenerationConfig.stop is
    if isinstance(stop, list) and len(stop) > 4:
        raise BadRequest(400, f"stop: got {len(stop)} texts; use up to 4", "stop")
    if _field(body, "n", int, None, "only n=1 is supported", 1) != 1:
        raise BadRequest(400, "n: only n=1 is supported", "n")
    kw = dict(max_new_tokens=max_tokens or 256, top_p=top_p, seed=seed, stop=stop)
    if temperature is not None:
        kw.update(temperature_settings(temperature))
    try:
        return model.generation_settings(**kw)
    except ConfigError as e:
        raise BadRequest(400, str(e)) from None


def prompt_ids(body: dict, kind: str, tokenizer) -> list[int]:
    """The token ids of a chat request's ``messages`` (chat template applied) or a
    completion request's ``prompt``."""
    if kind == "chat":
        messages = body.get("messages")
        error = messages_error(messages)
        if error:
            raise BadRequest(400, f"messages: {error.removeprefix('messages ')}", "messages")
        try:
            return tokenize(None, messages, tokenizer, True)
        except NoChatTemplate as e:
            raise BadRequest(400, f"{e}: use /v1/completions", "messages") from None
        except ValueError as e:
            raise BadRequest(400, str(e), "messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest(400, f"prompt: got {prompt!r}; write the prompt text", "prompt")
    return tokenize(prompt, None, tokenizer, False)


class TextStream:
    """The completion's text as it grows, cut before a stop text, holding back a tail that
    could still become one (so a streamed stop text never reaches the client)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = 0

    def add(self, token: int | None, final: bool) -> str:
        """The new text to send after ``token`` (None: nothing new); all of it when ``final``."""
        if token is not None:
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        kept, hit = cut_at_stop(text, self.stop)
        cut = len(kept)
        hold = 0 if final or hit else max((len(s) - 1 for s in self.stop), default=0)
        if not final and text.endswith("\ufffd"):  # a character whose bytes are not all here yet
            hold = max(hold, 1)
        ready = max(self.sent, min(cut, len(text) - hold))
        piece, self.sent = text[self.sent:ready], ready
        return piece


class Server:
    """The HTTP face of one model.

    Args:
        model: a started ``DistModel``.
        scheduler: its :class:`~distlayer.scheduler.Scheduler`.
        name: the model name clients pass (``GET /v1/models`` lists it).
        api_key: when set, every request needs ``Authorization: Bearer <api_key>`` (but
            ``/health`` and ``/metrics``, which a load balancer and Prometheus read, as vLLM's).
    """

    OPEN_PATHS = ("/health", "/metrics")  # no API key needed

    def __init__(self, model, scheduler, name: str, api_key: str | None = None):
        self.model, self.scheduler, self.name, self.api_key = model, scheduler, name, api_key
        self.created = int(time.time())
        self.registry, self.requests = server_registry(model, scheduler, name)

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", lambda r: self.complete(r, "chat"))
        app.router.add_post("/v1/completions", lambda r: self.complete(r, "text"))
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            if self.api_key and request.path not in self.OPEN_PATHS and \
                    request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
                raise BadRequest(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                 code="invalid_api_key")
            return await handler(request)
        except BadRequest as e:
            return e.response()
        except web.HTTPNotFound:
            return BadRequest(404, f"no such path: {request.path}").response()
        except web.HTTPMethodNotAllowed:
            return BadRequest(405, f"{request.method} is not allowed on {request.path}").response()
        except StageError as e:
            return BadRequest(503, str(e)).response()
        except DistlayerError as e:
            return BadRequest(503 if self.scheduler.failure else 400, str(e)).response()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "distlayer"}]})

    async def health(self, request: web.Request) -> web.Response:
        """Every stage answers (its stats) within 30 s, and the scheduler runs."""
        if self.scheduler.failure is not None:
            raise BadRequest(503, f"the pipeline failed: {self.scheduler.failure}")
        try:
            stats = await asyncio.wait_for(asyncio.to_thread(self.model.stats), timeout=30)
        except asyncio.TimeoutError:
            raise BadRequest(503, "a stage did not answer within 30 s") from None
        except DistlayerError as e:
            raise BadRequest(503, str(e)) from None
        return web.json_response({"status": "ok", "in_flight": self.scheduler.in_flight(), "stages": [
            {"stage": p.stage, "node_ip": p.node_ip, "pid": p.pid, "kv_bytes": s.get("kv_bytes"),
             "restarts": s.get("restarts", 0)}
            for p, s in zip(self.model.plan, stats)]})

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus' text format: the request series, rows running and waiting, and each
        stage's stats as they are now (read off this loop: the stages may take a moment)."""
        body, content_type = await asyncio.to_thread(render, self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise BadRequest(400, f"model: got {model!r}; name the model ({self.name!r})", "model")
        if model != self.name:
            raise BadRequest(404, f"the model {model!r} does not exist: this server serves {self.name!r}", "model",
                             "model_not_found")
        return body

    async def complete(self, request: web.Request, kind: str) -> web.StreamResponse:
        """A chat or text completion, streamed or whole."""
        arrived = time.monotonic()
        body = await self._body(request)
        settings = generation_settings(body, self.model)
        ids = prompt_ids(body, kind, self.model.tokenizer)
        context = self.scheduler.context
        too_long = context_error(len(ids), settings.max_new_tokens, context, "max_tokens")
        if too_long:
            raise BadRequest(413, too_long, "messages" if kind == "chat" else "prompt", "context_length_exceeded")
        stream = _field(body, "stream", bool, None, "write true or false", False)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        timer = self.requests.track(len(ids), arrived)

        def listener(event, value):  # on the scheduler's thread
            timer(event, value)
            loop.call_soon_threadsafe(events.put_nowait, (event, value))

        req = self.scheduler.submit(ids, settings, listener)
        try:
            if stream:
                return await self._stream(request, kind, body, req, events)
            return await self._whole(request, kind, req, events)
        finally:
            req.cancel()  # a client gone (or any failure) frees its rows at the next step

    async def _next(self, request: web.Request, events: asyncio.Queue):
        """The next scheduler event; a client that went away ends the wait."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("the client went away") from None

    async def _whole(self, request, kind: str, req, events) -> web.Response:
        while True:
            event, value = await self._next(request, events)
            if event == "error":
                raise value
            if event == "end":
                break
        choice = {"index": 0, "finish_reason": req.finish_reason,
                  **({"message": {"role": "assistant", "content": req.text}} if kind == "chat"
                     else {"text": req.text, "logprobs": None})}
        return web.json_response({
            "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{req.id}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": self.name, "choices": [choice], "usage": _usage(req)})

    async def _stream(self, request, kind: str, body: dict, req, events) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        base = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{req.id}", "object": CHUNK_TYPES[kind],
                "created": int(time.time()), "model": self.name}

        async def send(piece: str | None, finish: str | None = None, role: bool = False) -> None:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            await resp.write(f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode())

        text = TextStream(self.model.tokenizer, req.settings.stop)
        try:
            if kind == "chat":
                await send(None, role=True)
            while True:
                event, value = await self._next(request, events)
                if event == "error":
                    status = 503 if isinstance(value, StageError) else 500
                    await resp.write(f"data: {json.dumps({'error': {'message': str(value), 'code': status}})}\n\n"
                                     .encode())
                    break
                piece = text.add(value if event == "token" else None, final=event == "end")
                if piece:
                    await send(piece)
                if event == "end":
                    await send(None, finish=req.finish_reason)
                    if (body.get("stream_options") or {}).get("include_usage"):
                        await resp.write(f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(req)})}\n\n"
                                         .encode())
                    break
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            req.cancel()
        return resp


def _usage(req) -> dict:
    n = len(req.tokens)
    return {"prompt_tokens": len(req.prompt), "completion_tokens": n, "total_tokens": len(req.prompt) + n}


def listen(host: str, port: int) -> socket.socket:
    """Bind and listen now, before the model loads: the port is held from this moment (nothing
    else, Ray's own servers included, can take it meanwhile), and a taken port is named at once
    instead of after minutes of loading. Port 0 lets the system choose."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; stop what holds that port "
                          f"or pick another with --port (0 lets the system choose one)") from None


def serve(model, scheduler, name: str, sock: socket.socket, api_key: str | None = None, ready=None) -> None:
    """Serve on the listening ``sock`` (see ``listen``) until SIGINT or SIGTERM, then stop the
    scheduler (the caller closes the model).

    Args:
        ready: called with the bound port once the server accepts requests.
    """
    app = Server(model, scheduler, name, api_key).app()

    async def started(_app):
        if ready is not None:
            ready(sock.getsockname()[1])

    app.on_startup.append(started)
    app.on_shutdown.append(lambda _app: asyncio.to_thread(scheduler.close))
    web.run_app(app, sock=sock, print=None, handle_signals=True, shutdown_timeout=5)
