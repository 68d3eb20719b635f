"""The chat page (`gemma4 serve` at `/`) in a real headless Chromium driven by selenium.

One browser and one server (with an API key, so the page's key field is exercised) serve the whole
module. The tiny model's replies are random text; scripted replies (`#name` in a message, as in
serve_helpers.ScriptHook) drive thinking, tool calls and a reply that carries HTML. `#slow` makes
every decode step take 30 ms, so a reply can be stopped mid-stream.

Without Chromium (Debian's `chromium` and `chromium-driver`) these tests skip, except in CI
(`CI` set), where they fail: .ci/run installs both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import httpx
import pytest
from serve_helpers import MODEL_NAME, ScriptHook, running_server

KEY = "ui-test-key"
HTML_REPLY = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2"> **bold** `a<b>`'


class Slow:
    """A constraint that allows everything, 30 ms per decode step."""

    def allowed(self):
        time.sleep(0.03)
        return None

    def advance(self, token):
        pass


class UIHook(ScriptHook):
    SCRIPTS = ScriptHook.SCRIPTS | {"html": HTML_REPLY + "<turn|>"}

    def __call__(self, request, prompt_ids):
        last = request.messages[-1].content
        if isinstance(last, str) and "#slow" in last.split():
            return [Slow()]
        return super().__call__(request, prompt_ids)


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def driver():
    found = _chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing in CI: .ci/run must install them")
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    if os.environ.get("CI"):
        from selenium import webdriver  # the test extra has it: missing in CI is an error
    else:
        webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,860", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))
    browser.set_script_timeout(20)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def server(loaded):
    from gemma4.serve import ServeConfig, build_app

    model, tokenizer, fmt = loaded
    config = ServeConfig(model_name=MODEL_NAME, api_key=KEY, max_model_len=512, max_tokens_default=32,
                         shutdown_timeout=2)
    app = build_app(model, tokenizer, chat_format=fmt, config=config, constraint_hook=UIHook(tokenizer))
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def page(driver, server):
    """The page, loaded, with the API key entered and greedy settings."""
    url, _ = server
    driver.get(url + "/")
    wait(driver, lambda d: "API key" in d.find_element("id", "notice").text)
    click(driver, "settings-toggle")
    type_into(driver, "api-key", KEY)
    driver.find_element("id", "temperature").click()  # the key field's change event reloads the models
    type_into(driver, "temperature", "0")
    type_into(driver, "max_tokens", "24")
    wait(driver, lambda d: d.find_element("id", "model-name").text == MODEL_NAME)
    click(driver, "settings-toggle")
    return driver


# -- helpers --------------------------------------------------------------------------------------

def wait(driver, condition, timeout=20.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def click(driver, element_id):
    driver.find_element("id", element_id).click()


def type_into(driver, element_id, text):
    box = driver.find_element("id", element_id)
    box.clear()
    box.send_keys(text)


def set_setting(driver, element_id, value):
    """Sets a settings field as typing would (its input and change events fire), panel open or not."""
    driver.execute_script("const f = document.getElementById(arguments[0]); f.value = arguments[1];"
                          "for (const e of ['input', 'change']) f.dispatchEvent(new Event(e, {bubbles: true}))",
                          element_id, value)


def stored(driver) -> dict:
    return driver.execute_script("return JSON.parse(localStorage.getItem('gemma4.chat.conversations'))")


def current(driver) -> dict:
    data = stored(driver)
    return next(c for c in data["chats"] if c["id"] == data["current"])


def finished(driver) -> bool:
    messages = current(driver)["messages"]
    return messages[-1]["role"] == "assistant" and not messages[-1]["meta"].get("pending")


def send(driver, text, *, new_chat=True, max_tokens=24):
    from selenium.webdriver.common.keys import Keys

    set_setting(driver, "max_tokens", str(max_tokens))
    if new_chat:
        click(driver, "new-chat")
    box = driver.find_element("id", "input")
    box.send_keys(text)
    count = len(current(driver)["messages"]) if stored(driver) and not new_chat else 0
    box.send_keys(Keys.ENTER)
    wait(driver, lambda d: len(current(d)["messages"]) >= count + 2 and finished(d))
    return current(driver)["messages"][-1]


def last_reply(driver):
    return driver.find_elements("css selector", "#messages .msg.assistant")[-1]


def api_reply(url, messages, **fields) -> dict:
    body = {"model": MODEL_NAME, "messages": messages, **fields}
    response = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]


# -- the route and its security -------------------------------------------------------------------

def test_page_is_public_but_the_api_keeps_its_key(server):
    url, _ = server
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for path in ("/ui/chat.js", "/ui/markdown.js", "/ui/chat.css"):
        assert httpx.get(url + path).status_code == 200, path
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/ui/other.js").status_code == 401  # only the page's own files are public
    assert httpx.get(url + "/", headers={"Host": "evil.example"}).status_code == 403  # DNS rebinding
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["data"][0]["capabilities"] == {"image": False, "video": False, "audio": False, "thinking": True,
                                                      "tools": True}


def test_no_ui_serves_no_page(loaded):
    from gemma4.serve import ServeConfig, build_app
    from gemma4.serve.cli import add_serve_arguments

    assert add_serve_arguments(argparse.ArgumentParser()).parse_args(["--no-ui"]).no_ui
    model, tokenizer, fmt = loaded
    app = build_app(model, tokenizer, chat_format=fmt, config=ServeConfig(model_name=MODEL_NAME, ui=False))
    with running_server(app) as url:
        assert httpx.get(url + "/").status_code == 404
        assert httpx.get(url + "/ui/chat.js").status_code == 404


# -- in the browser -------------------------------------------------------------------------------

def test_streamed_reply_equals_the_greedy_api_reply(page, server):
    url, _ = server
    reply = send(page, "Hello there")
    expected = api_reply(url, [{"role": "user", "content": "Hello there"}], max_tokens=24, temperature=0)
    assert reply["content"] == expected["content"] and reply["content"]
    shown = last_reply(page)
    shown.find_element("css selector", "button.toggle-source").click()
    source = wait(page, lambda d: last_reply(d).find_element("css selector", "pre.source"))
    assert source.get_attribute("textContent") == expected["content"]
    meta = last_reply(page).find_element("css selector", ".meta").text
    assert meta.startswith(MODEL_NAME) and "tok/s" in meta and f"{reply['meta']['tokens']} tokens" in meta


def test_edit_and_resend_then_regenerate(page, server):
    url, _ = server
    send(page, "first try")
    page.find_element("css selector", "#messages .msg.user button.edit").click()
    box = page.find_element("css selector", "#messages .msg.user textarea.edit-box")
    box.clear()
    box.send_keys("second try")
    page.find_element("css selector", "#messages .msg.user button.save-edit").click()
    wait(page, lambda d: current(d)["messages"][0]["content"] == "second try" and finished(d))
    messages = current(page)["messages"]
    assert len(messages) == 2
    expected = api_reply(url, [{"role": "user", "content": "second try"}], max_tokens=24, temperature=0)["content"]
    assert messages[1]["content"] == expected
    first_id = messages[1]["id"]
    last_reply(page).find_element("css selector", "button.regenerate").click()
    wait(page, lambda d: current(d)["messages"][-1]["id"] != first_id and finished(d))
    messages = current(page)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"] == expected


def test_stop_a_reply_mid_stream(page, server):
    _, app = server
    from selenium.webdriver.common.keys import Keys

    click(page, "new-chat")
    set_setting(page, "max_tokens", "400")

    page.find_element("id", "input").send_keys("#slow go", Keys.ENTER)
    wait(page, lambda d: d.find_element("id", "stop").is_displayed())
    wait(page, lambda d: len(d.execute_script(
        "return document.querySelector('#messages .msg.assistant .content').textContent")) > 3)
    click(page, "stop")
    wait(page, finished)
    reply = current(page)["messages"][-1]
    assert reply["meta"]["finish"] == "stopped" and reply["content"]
    assert "stopped" in last_reply(page).find_element("css selector", ".meta").text
    assert page.find_element("id", "send").is_displayed()
    scheduler = app.state.gemma4.served.scheduler
    deadline = time.monotonic() + 5
    while scheduler.stats().running and time.monotonic() < deadline:  # the server cancelled it too
        time.sleep(0.05)
    assert scheduler.stats().running == 0


def test_thinking_is_folded_apart_from_the_answer(page):
    reply = send(page, "#thought", max_tokens=100)
    assert reply["reasoning"] == "The user asks about Paris." and reply["content"] == "It is sunny in Paris."
    shown = last_reply(page)
    details = shown.find_element("css selector", "details.thinking")
    assert details.get_attribute("open") is None  # folded
    assert details.find_element("css selector", ".thinking-text").get_attribute("textContent") == reply["reasoning"]
    assert shown.find_element("css selector", ".content").text == "It is sunny in Paris."


def test_tool_calls_and_results_are_shown_as_such(page):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    set_setting(page, "tools", json.dumps(tools))
    try:
        reply = send(page, "#weather-call", max_tokens=100)
        assert reply["meta"]["finish"] == "tool_calls"
        assert json.loads(reply["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
        card = last_reply(page).find_element("css selector", ".tool-call")
        assert "Tool call: get_weather" in card.text and '"city": "Paris"' in card.text
        form = last_reply(page).find_element("css selector", "form.tool-results")
        form.find_element("css selector", "textarea").send_keys("Sunny, 21 C")
        form.find_element("css selector", "button").click()
        wait(page, lambda d: current(d)["messages"][-2]["role"] == "tool" and finished(d))
        tool = page.find_element("css selector", "#messages .msg.tool")
        assert "Tool result: get_weather" in tool.text and "Sunny, 21 C" in tool.text
    finally:
        set_setting(page, "tools", "")


def _no_html_ran(driver):
    assert driver.execute_script("return window.pwned") is None
    assert not driver.find_elements("css selector", "#messages script, #messages img, #messages iframe")


def test_streamed_html_stays_text(page):
    reply = send(page, "#html", max_tokens=100)
    assert reply["content"] == HTML_REPLY
    content = last_reply(page).find_element("css selector", ".content")
    assert "<script>window.pwned=1</script>" in content.text and 'onerror="window.pwned=2"' in content.text
    assert content.find_element("css selector", "strong").text == "bold"
    assert content.find_element("css selector", "code").text == "a<b>"
    _no_html_ran(page)


def test_reload_finds_the_conversations(page, server):
    titles = [c["title"] for c in stored(page)["chats"]]
    page.refresh()
    wait(page, lambda d: d.find_element("id", "model-name").text == MODEL_NAME)
    fetched = page.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert fetched and all(u.startswith(server[0] + "/") for u in fetched), fetched  # nothing beyond the server
    listed = [b.text for b in page.find_elements("css selector", "#chat-list .chat-title")]
    assert listed == titles and "Hello there" in listed
    page.find_elements("css selector", "#chat-list .chat-title")[listed.index("Hello there")].click()
    wait(page, lambda d: d.find_element("css selector", "#messages .msg.user .content").text == "Hello there")
    assert current(page)["title"] == "Hello there"
    assert len(page.find_elements("css selector", "#messages .msg.assistant")) == 1
    _no_html_ran(page)


STORED = {"version": 1, "current": "c1", "chats": [{"id": "c1", "title": "Stored", "created": 0, "messages": [
    {"id": "m1", "role": "user", "content": "<b>hi</b> <script>window.pwned=3</script>"},
    {"id": "m2", "role": "assistant", "reasoning": "<img src=x onerror=\"window.pwned=4\">",
     "content": "# Title <i>x</i>\n\n- item **one**\n- [bad](javascript:window.pwned=5) and [good](https://example.org)"
                "\n\n```html\n<script>window.pwned=6</script>\n```\n\n| a | b |\n|---|---|\n| <u>1</u> | 2 |",
     "meta": {"model": "m", "tokens": 5, "tps": 10.0, "finish": "stop"}}]}]}


def test_stored_markdown_renders_safely(page):
    page.execute_script("localStorage.setItem('gemma4.chat.conversations', arguments[0])", json.dumps(STORED))
    page.refresh()
    wait(page, lambda d: d.find_elements("css selector", "#messages .msg.assistant"))
    reply = last_reply(page)
    assert reply.find_element("css selector", "h1").text == "Title <i>x</i>"
    assert reply.find_element("css selector", "li strong").text == "one"
    links = reply.find_elements("css selector", "a")
    assert [a.get_attribute("href") for a in links] == ["https://example.org/"]
    assert "javascript:window.pwned=5" in reply.find_element("css selector", "ul").text  # shown, not followed
    assert reply.find_element("css selector", ".code-block code").get_attribute("textContent") == \
        "<script>window.pwned=6</script>"
    assert reply.find_element("css selector", "td").text == "<u>1</u>"
    assert "window.pwned=4" in reply.find_element("css selector", ".thinking-text").get_attribute("textContent")
    assert page.find_element("css selector", "#messages .msg.user .content").text.startswith("<b>hi</b>")
    _no_html_ran(page)


SHOWCASE = {"version": 1, "current": "s1", "chats": [
    {"id": "s1", "title": "Reverse a list in Python", "created": 0, "messages": [
        {"id": "u1", "role": "user", "content": "How do I reverse a list in Python? Keep it short."},
        {"id": "a1", "role": "assistant",
         "reasoning": "The user wants the idiomatic ways: slicing, reversed(), list.reverse(). Mention which copies.",
         "content": "Three ways:\n\n1. **Slicing** makes a reversed copy:\n\n```python\nitems = [1, 2, 3]\n"
                    "print(items[::-1])  # [3, 2, 1]\n```\n\n2. `reversed(items)` gives an iterator, no copy.\n"
                    "3. `items.reverse()` reverses *in place* and returns `None`.",
         "meta": {"model": MODEL_NAME, "tokens": 71, "tps": 42.5, "finish": "stop"}},
        {"id": "u2", "role": "user", "content": "What's the weather in Paris?"},
        {"id": "a2", "role": "assistant", "content": "", "meta": {"model": MODEL_NAME, "tokens": 12, "tps": 40.1,
                                                                  "finish": "tool_calls"},
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"id": "t1", "role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "Sunny, 21 C"},
        {"id": "a3", "role": "assistant", "content": "It is sunny in Paris, 21 °C.",
         "meta": {"model": MODEL_NAME, "tokens": 11, "tps": 41.7, "finish": "stop"}}]},
    {"id": "s2", "title": "Hello there", "created": 0, "messages": []}]}


MARKDOWN = {
    "**b** and *i* and ~~s~~": "<p><strong>b</strong> and <em>i</em> and <del>s</del></p>",
    "snake_case_name and 2 * 3 * 4": "<p>snake_case_name and 2 * 3 * 4</p>",
    "`<x>` <script>alert(1)</script>": "<p><code>&lt;x&gt;</code> &lt;script&gt;alert(1)&lt;/script&gt;</p>",
    "[t](javascript:alert(1)) [u](https://a.org/x)": '<p>t (javascript:alert(1)) <a href="https://a.org/x" '
                                                     'target="_blank" rel="noopener noreferrer">u</a></p>',
    "see https://a.org/b.": '<p>see <a href="https://a.org/b" target="_blank" rel="noopener noreferrer">'
                            "https://a.org/b</a>.</p>",
    "# H *x*\n\ntext\nmore": "<h1>H <em>x</em></h1><p>text<br>more</p>",
    "1. a\n2. b\n\n- c\n  - d": "<ol><li>a</li><li>b</li></ol><ul><li><p>c</p><ul><li>d</li></ul></li></ul>",
    "> q\n\n---": "<blockquote><p>q</p></blockquote><hr>",
    "| a | b |\n|---|:-:|\n| 1 | `2` |": '<div class="table-wrap"><table><thead><tr><th>a</th><th>b</th></tr></thead>'
                                          "<tbody><tr><td>1</td><td><code>2</code></td></tr></tbody></table></div>",
}


def test_markdown_renderer(page):
    rendered = page.execute_async_script(
        "const [cases, done] = [arguments[0], arguments[arguments.length - 1]];"
        "import('/ui/markdown.js').then((md) => done(cases.map((text) => {"
        "  const box = document.createElement('div'); box.append(md.render(text)); return box.innerHTML; })));",
        list(MARKDOWN))
    assert dict(zip(MARKDOWN, rendered)) == MARKDOWN
    code = page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('/ui/markdown.js').then((md) => { const box = document.createElement('div');"
        "  box.append(md.render('```py\\nx = 1\\n<b>')); done([box.querySelector('code').className,"
        "  box.querySelector('code').textContent, box.querySelector('.code-lang').textContent]); });")
    assert code == ["language-py", "x = 1\n<b>", "py"]  # an unclosed fence (still streaming) runs to the end


def test_screenshot(page, tmp_path):
    """A picture of the page; GEMMA4_UI_SCREENSHOT=docs/images/chat-page.png writes the docs' one."""
    page.execute_script("localStorage.setItem('gemma4.chat.conversations', arguments[0])", json.dumps(SHOWCASE))
    page.refresh()
    wait(page, lambda d: d.find_element("id", "model-name").text == MODEL_NAME)
    wait(page, lambda d: d.find_elements("css selector", "#messages .code-block"))
    page.find_element("css selector", "#messages details.thinking summary").click()
    page.set_window_size(1280, 1180)
    page.execute_script("document.getElementById('messages').scrollTop = 0")
    target = os.environ.get("GEMMA4_UI_SCREENSHOT") or str(tmp_path / "chat-page.png")
    assert page.save_screenshot(target)
    assert os.path.getsize(target) > 10_000
