"""The unmodified `openai` SDK against a `flint serve` that requires an API key: with the
key, Chat Completions, the Responses API and its WebSocket mode are served; without it or
with a wrong one, each is refused with 401, which the SDK raises as AuthenticationError.
Usage: security.py BASE_URL KEY. Exits non-zero on the first failed check."""

import sys

import openai

BASE, KEY = sys.argv[1].rstrip("/"), sys.argv[2]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


def client(key, headers=None):
    return openai.OpenAI(base_url=BASE + "/v1", api_key=key, max_retries=0, default_headers=headers)


good = client(KEY)
MODEL = good.models.list().data[0].id
chat = good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
check(chat.choices[0].message.content, "with the key: chat.completions is served")
resp = good.responses.create(model=MODEL, input="Say hi.", max_output_tokens=8)
check(resp.output_text, "with the key: responses.create is served")
with good.responses.connect() as conn:
    conn.response.create(model=MODEL, input="Say hi.", max_output_tokens=8)
    done = None
    for ev in conn:
        if ev.type in ("response.completed", "response.incomplete", "response.failed", "error"):
            done = ev
            break
    check(done is not None and done.type in ("response.completed", "response.incomplete"),
          "with the key: the Responses WebSocket mode is served")

# Without a key: the SDK insists on one, so its Authorization header is blanked instead.
for name, bad in [("a wrong key", client(KEY + "x")), ("no key", client("unused", {"Authorization": ""}))]:
    for what, call in [
        ("models.list", lambda: bad.models.list()),
        ("chat.completions", lambda: bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])),
        ("responses.create", lambda: bad.responses.create(model=MODEL, input="hi")),
    ]:
        try:
            call()
            raise AssertionError(f"{name}: {what} was served")
        except openai.AuthenticationError as e:
            check(e.status_code == 401 and e.code == "invalid_api_key", f"{name}: {what} is refused with 401 invalid_api_key")
    try:
        with bad.responses.connect() as conn:
            conn.response.create(model=MODEL, input="hi")
            next(iter(conn))
        raise AssertionError(f"{name}: the WebSocket mode was served")
    except openai.AuthenticationError:
        raise
    except Exception as e:  # the handshake's refusal, as the websockets library raises it
        check("401" in str(e), f"{name}: the WebSocket mode's handshake is refused with 401 ({type(e).__name__})")
print("all SDK security checks passed")
