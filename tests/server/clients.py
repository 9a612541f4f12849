"""Drive a running `flint serve` with unmodified real clients: the official `openai`
package (streaming and not, chat and completions, predicted outputs, errors) and the
`websockets` package (a session with cancel and redirect). Usage: clients.py BASE_URL.
Exits non-zero on the first failed check."""

import asyncio
import json
import sys

import openai
import websockets

BASE = sys.argv[1].rstrip("/")
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused")
MODEL = client.models.list().data[0].id
CHAT = [{"role": "user", "content": "Write a Python function that returns the square of a number."}]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


def chat_whole_and_streamed_agree():
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=48, temperature=0)
    text = whole.choices[0].message.content
    check(whole.object == "chat.completion" and text, "non-streaming chat answers")
    check(whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0, "usage is reported")
    check(whole.choices[0].finish_reason in ("stop", "length"), "finish_reason is stop or length")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=48, temperature=0, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == text, "streamed chat equals the non-streaming answer")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens,
          "the final stream chunk carries usage")
    check(chunks[-1].usage.prompt_tokens_details.cached_tokens > 0, "a repeated prompt reuses its KV cache")
    return text


def predicted_outputs(expected):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=48, temperature=0,
                                       prediction={"type": "content", "content": expected})
    check(r.choices[0].message.content == expected, "a prediction does not change the greedy answer")
    d = r.usage.completion_tokens_details
    check(d.accepted_prediction_tokens > 0, f"prediction tokens were accepted ({d.accepted_prediction_tokens})")
    print("  accepted", d.accepted_prediction_tokens, "rejected", d.rejected_prediction_tokens,
          "of", r.usage.completion_tokens, "completion tokens")


def completions():
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=16, temperature=0)
    check(r.object == "text_completion" and r.choices[0].text, "completions answers")
    s = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="def add(a, b):", max_tokens=16, temperature=0, stream=True))
    check(s == r.choices[0].text, "streamed completion equals the non-streaming one")


def errors():
    try:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=-1)
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body["code"] == "invalid_request", "bad sampling values are a 400")
    else:
        raise AssertionError("temperature=-1 was accepted")
    try:
        client.chat.completions.create(model=MODEL, messages=[])
    except openai.BadRequestError:
        check(True, "empty messages are a 400")


async def websocket_session():
    async with websockets.connect(BASE.replace("http", "ws", 1) + "/v1/ws") as ws:
        hello = json.loads(await ws.recv())
        check(hello["type"] == "session" and hello["model"] == MODEL, "the session greets with the model")

        async def until_done():
            deltas = []
            while True:
                m = json.loads(await ws.recv())
                if m["type"] == "delta":
                    deltas.append(m)
                elif m["type"] in ("done", "error"):
                    return deltas, m

        await ws.send(json.dumps({"type": "generate", "content": "Count from 1 to 100.", "max_tokens": 400, "temperature": 0.7}))
        first = json.loads(await ws.recv())
        check(first["type"] == "delta", "tokens stream")
        await ws.send(json.dumps({"type": "cancel"}))
        _, done = await until_done()
        check(done["finish_reason"] == "cancelled", "cancel stops the answer")
        await ws.send(json.dumps({"type": "generate", "content": "Write a long essay about rivers.", "max_tokens": 400}))
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "redirect", "content": "Actually, one sentence about lakes.", "max_tokens": 30}))
        _, done = await until_done()
        check(done["finish_reason"] == "redirected", "redirect stops the answer")
        deltas, done = await until_done()
        check(done["type"] == "done" and done["usage"]["cached_tokens"] > 0, "the redirected turn reuses the conversation's KV")
        await ws.send("{oops")
        err = json.loads(await ws.recv())
        check(err["type"] == "error" and err["code"] == "invalid_json", "malformed JSON gets an error event")
        await ws.send(json.dumps({"type": "generate", "content": "Hi", "max_tokens": 4}))
        _, done = await until_done()
        check(done["type"] == "done", "the session stays usable after bad input")


answer = chat_whole_and_streamed_agree()
predicted_outputs(answer)
completions()
errors()
asyncio.run(websocket_session())
print("all client checks passed")
