"""Drive a running `flint serve` through the Responses API with the unmodified official
`openai` SDK: `responses.create` whole and streamed, the `responses.stream()` helper, a
chain of turns on `previous_response_id` (whose KV cache is reused), retrieve and delete,
errors, and the WebSocket mode (`responses.connect()`) with `response.create`,
`previous_response_id`, `response.steer`, lanes and Flint's `response.cancel`.
Usage: responses.py BASE_URL. Exits non-zero on the first failed check."""

import sys

import openai

BASE = sys.argv[1].rstrip("/")
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0)
MODEL = client.models.list().data[0].id
ASK = "Write a Python function that returns the square of a number."
ORDER = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
         "response.output_text.delta", "response.output_text.done", "response.content_part.done",
         "response.output_item.done", "response.completed"]
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


def collapse(types):
    """Event types with runs of deltas collapsed to one."""
    out = []
    for t in types:
        if not out or out[-1] != t or t != "response.output_text.delta":
            out.append(t)
    return out


def http_whole_streamed_and_helper():
    whole = client.responses.create(model=MODEL, input=ASK, max_output_tokens=40, temperature=0)
    check(whole.object == "response" and whole.id.startswith("resp_"), "responses.create answers a Response")
    check(whole.status in ("completed", "incomplete") and whole.output_text, "the response has output text")
    u = whole.usage
    check(u.input_tokens > 0 and u.output_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens,
          "usage: input, output and total tokens")
    check(u.output_tokens_details.reasoning_tokens == 0 and u.input_tokens_details.cached_tokens >= 0,
          "usage details are present")
    events = list(client.responses.create(model=MODEL, input=ASK, max_output_tokens=40, temperature=0, stream=True))
    types = collapse([e.type for e in events])
    final = "response.completed" if whole.status == "completed" else "response.incomplete"
    check(types == ORDER[:-1] + [final], f"the stream's events come in OpenAI's order: {types}")
    seq = [e.sequence_number for e in events]
    check(seq == sorted(seq) and len(set(seq)) == len(seq), "sequence numbers increase")
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    check(streamed == whole.output_text, "streamed text equals the whole response's")
    check(events[-1].response.usage.input_tokens_details.cached_tokens > 0, "a repeated input reuses its KV cache")
    with client.responses.stream(model=MODEL, input=ASK, max_output_tokens=200, temperature=0) as s:
        texts = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    check(final.status == "completed" and final.output_text == "".join(texts), "responses.stream() accumulates the answer")
    return final


def chain_on_previous_response_id(first):
    second = client.responses.create(model=MODEL, previous_response_id=first.id, temperature=0, max_output_tokens=20,
                                     input=[{"role": "user", "content": [{"type": "input_text", "text": "Now in one line."}]}])
    cached = second.usage.input_tokens_details.cached_tokens
    check(second.previous_response_id == first.id, "the continuation names its predecessor")
    check(cached >= first.usage.input_tokens, f"the continuation prefills only its new input ({cached} cached of {second.usage.input_tokens})")
    got = client.responses.retrieve(second.id)
    check(got.id == second.id and got.output_text == second.output_text, "GET /v1/responses/{id}")
    client.responses.delete(second.id)
    try:
        client.responses.retrieve(second.id)
        check(False, "a deleted response is gone")
    except openai.NotFoundError:
        check(True, "a deleted response is gone (404)")
    try:
        client.responses.create(model=MODEL, previous_response_id="resp_nope", input="hi")
        check(False, "an unknown previous_response_id is refused")
    except openai.BadRequestError as e:
        check(e.code == "previous_response_not_found", "an unknown previous_response_id: 400 previous_response_not_found")
    short = client.responses.create(model=MODEL, input=ASK, max_output_tokens=3)
    check(short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens",
          "max_output_tokens ends a response as incomplete")
    try:
        client.responses.create(model=MODEL, input=ASK * 4000)
        check(False, "an oversize input is refused")
    except openai.BadRequestError as e:
        check(e.code == "context_length_exceeded", "an oversize input: 400 context_length_exceeded")
    odd = client.responses.create(
        model=MODEL, max_output_tokens=5, store=False, tools=[{"type": "web_search"}, {"type": "function", "name": "f", "parameters": {}}],
        input=[{"type": "reasoning", "id": "rs_1", "summary": []}, {"role": "developer", "content": "Be brief."},
               {"role": "user", "content": "hi"}, {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
               {"type": "function_call_output", "call_id": "c1", "output": "42"}], extra_body={"unknown_field": 1})
    check(odd.status in ("completed", "incomplete"), "unknown items, tool types and fields are accepted")


def turn(conn, **create):
    """One response.create over the socket: (types, final response)."""
    conn.response.create(**create)
    types = []
    for e in conn:
        types.append(e.type)
        if e.type == "error":
            raise AssertionError(f"error event: {e}")
        if e.type in TERMINAL:
            return types, e.response
    raise AssertionError("the socket closed before the response ended")


def websocket_mode():
    with client.responses.connect() as conn:
        types, first = turn(conn, model=MODEL, input=ASK, max_output_tokens=24, temperature=0)
        check(collapse(types)[:5] == ORDER[:5] and first.output_text, "WebSocket mode: the same events over the socket")
        _, second = turn(conn, model=MODEL, previous_response_id=first.id, store=False, max_output_tokens=8,
                         input=[{"role": "user", "content": "And in Rust?"}])
        check(second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens,
              "WebSocket mode: a continuation prefills only its new input")
        # Kept by the connection although not stored.
        _, third = turn(conn, model=MODEL, previous_response_id=second.id, max_output_tokens=4, input="Thanks.")
        check(third.previous_response_id == second.id, "WebSocket mode: a store=false response continues on this socket")
        # Warm-up: an id, no output.
        _, warm = turn(conn, model=MODEL, input="def fib(n):", generate=False)
        check(warm.status == "completed" and not warm.output, "generate: false answers an id with no output")

        # Steer a long answer: it ends as steered, and its successor follows at once.
        conn.response.create(model=MODEL, input="Count from 1 to 1000, one number a line.", max_output_tokens=600, temperature=0)
        seen, steered, successor, running = [], None, None, None
        for e in conn:
            seen.append(e.type)
            if e.type == "response.created" and running is None:
                running = e.response.id
            if e.type == "response.output_text.delta" and steered is None and seen.count("response.output_text.delta") == 5:
                conn.response.steer(input="Stop counting and say OK.", previous_response_id=running)
            if e.type == "response.steer.accepted":
                check(True, "response.steer is accepted while the response runs")
            if e.type == "response.incomplete" and steered is None:
                steered = e.response
            elif e.type in TERMINAL and steered is not None:
                successor = e.response
                break
        check(steered.incomplete_details.reason == "steered", "the steered response ends incomplete, reason steered")
        check(successor.previous_response_id == steered.id and successor.status in ("completed", "incomplete"),
              "the steered response's successor runs at once")
        check(successor.usage.input_tokens_details.cached_tokens >= steered.usage.input_tokens,
              "the successor keeps the partial answer in its context and prefills only the steering input")

        # Steering with nothing running fails cleanly.
        conn.response.steer(input="nothing to steer", previous_response_id=successor.id)
        e = conn.recv()
        check(e.type == "response.steer.failed", "response.steer with nothing running: response.steer.failed")

        # Flint's response.cancel stops a response within a step.
        conn.response.create(model=MODEL, input=ASK, max_output_tokens=2000)
        for e in conn:
            if e.type == "response.output_text.delta":
                conn.send({"type": "response.cancel"})
            if e.type in TERMINAL:
                check(e.response.status == "cancelled", "response.cancel ends the response as cancelled")
                break

        # Errors are events; the socket stays usable.
        conn.response.create(model=MODEL, previous_response_id="resp_nope", input="x")
        e = conn.recv()
        check(e.type == "error" and e.error.code == "previous_response_not_found", "WebSocket errors are nested error events")
        _, again = turn(conn, model=MODEL, input="hi", max_output_tokens=2)
        check(again.status in ("completed", "incomplete"), "the socket serves on after an error")

        # Two lanes run side by side, each event tagged with its lane.
        conn.response.create(model=MODEL, input="a", max_output_tokens=6, stream_id="left")
        conn.response.create(model=MODEL, input="b", max_output_tokens=6, stream_id="right")
        ended, lanes = {}, set()
        for e in conn:
            lanes.add(getattr(e, "stream_id", None))
            if e.type in TERMINAL:
                ended[e.stream_id] = e.response
                if len(ended) == 2:
                    break
        check(set(ended) == {"left", "right"} and lanes == {"left", "right"}, "two lanes run, every event tagged with its lane")


if __name__ == "__main__":
    first = http_whole_streamed_and_helper()
    chain_on_previous_response_id(first)
    websocket_mode()
    print("all Responses API checks passed")
