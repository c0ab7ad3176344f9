"""nanochat/ui.html in headless Chromium (Debian's `chromium`, driven by Playwright's Python API), against the real
server code in-process with a scripted decoder, so that replies are known: send, stream, edit, regenerate, new chat,
calculator calls, an unreachable server, and model output containing HTML shown as text."""

import shutil
import threading
from pathlib import Path

import pytest

from test_chat_web import scripted_app, serve_in_thread

from pretraining_setup import install_tokenizer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT_MS = 60_000  # only ends a test whose page never gets there: not a speed bound


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip("the Debian package chromium is not installed (no /usr/bin/chromium); apt-get install chromium")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def held_reply():
    """A reply to a message with "hold" in it stops after its first word until the test sets this event."""
    return threading.Event()


@pytest.fixture(scope="module")
def site(tmp_path_factory, held_reply):
    tokenizer = install_tokenizer(tmp_path_factory.mktemp("ui") / "tok")
    special = tokenizer.encode_special
    replies = {"count": 0}

    def held(tokens):
        yield from tokens[:len("Reply")]
        held_reply.wait(timeout=TIMEOUT_MS / 1000)
        yield from tokens[len("Reply"):]

    def script(prompt):
        """Reply n to <the last user message>; canned replies for 'script' and 'calc'."""
        text = tokenizer.decode(prompt)
        question = text.rsplit("<|user_start|>", 1)[1].split("<|user_end|>", 1)[0]
        if "hold" in question:
            replies["count"] += 1
            return held(tokenizer.encode(f"Reply {replies['count']} to {question}"))
        if "script" in question:
            return tokenizer.encode("<script>alert(1)</script><b>bold</b> & done")
        if "calc" in question:
            return (tokenizer.encode("So ") + [special("<|python_start|>")] + tokenizer.encode("6*7")
                    + [special("<|python_end|>"), special("<|output_start|>")] + tokenizer.encode("42")
                    + [special("<|output_end|>")] + tokenizer.encode(" it is."))
        replies["count"] += 1
        return tokenizer.encode(f"Reply {replies['count']} to {question}")

    app, _ = scripted_app(tokenizer, script, step_seconds=0.01)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture
def page(browser, site):
    page = browser.new_page()
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(site)
    yield page
    page.close()


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")
    wait_for_reply(page)


def wait_for_reply(page):
    page.wait_for_selector(".message.assistant.streaming", state="detached", timeout=TIMEOUT_MS)
    page.wait_for_function("document.querySelectorAll('.message.assistant').length > 0 || "
                           "document.querySelector('.message.error')", timeout=TIMEOUT_MS)


def texts(page, selector):
    return page.locator(selector).all_text_contents()


def test_a_message_gets_a_streamed_reply(page, held_reply):
    page.fill("#input", "hold on")
    page.press("#input", "Enter")
    # the first word is on the page while the rest of the reply is still to come
    page.wait_for_function("document.querySelector('.message.assistant.streaming')?.textContent === 'Reply'",
                           timeout=TIMEOUT_MS)
    held_reply.set()
    wait_for_reply(page)
    assert texts(page, ".message.user") == ["hold on"]
    [reply] = texts(page, ".message.assistant")
    assert reply.startswith("Reply ") and reply.endswith(" to hold on")
    assert "connected" in page.text_content("#status") or "worker" in page.text_content("#status")


def test_editing_a_message_drops_the_later_turns_and_regenerating_replaces_a_reply(page):
    send(page, "first")
    send(page, "second")
    assert texts(page, ".message.user") == ["first", "second"]
    page.click(".message.user >> nth=0")
    page.fill(".message.user.editing textarea", "first, edited")
    page.click(".message.user.editing button:has-text('Send')")
    wait_for_reply(page)
    assert texts(page, ".message.user") == ["first, edited"]
    [reply] = texts(page, ".message.assistant")
    assert reply.endswith(" to first, edited")

    page.click(".message.assistant")
    page.wait_for_function(f"document.querySelector('.message.assistant') && "
                           f"!document.querySelector('.streaming') && "
                           f"document.querySelector('.message.assistant').textContent !== {reply!r}",
                           timeout=TIMEOUT_MS)
    [regenerated] = texts(page, ".message.assistant")
    assert regenerated != reply and regenerated.endswith(" to first, edited")
    assert texts(page, ".message.user") == ["first, edited"]


def test_new_chat_clears_the_conversation(page):
    send(page, "something")
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    send(page, "again")
    assert texts(page, ".message.user") == ["again"]


def test_model_output_with_html_is_shown_as_text(page):
    send(page, "show me a script")
    [reply] = texts(page, ".message.assistant")
    assert reply == "<script>alert(1)</script><b>bold</b> & done"
    assert page.locator("#messages script").count() == 0 and page.locator("#messages b").count() == 0
    assert page.dialogs == []


def test_a_calculator_call_is_shown_with_its_result(page):
    send(page, "calc please")
    assert texts(page, ".message.assistant .tool") == ["calculator: 6*7", "= 42"]
    [reply] = texts(page, ".message.assistant")
    assert reply.startswith("So ") and reply.endswith(" it is.")
    send(page, "and again")  # the parts go back to the server as the assistant's content
    assert len(texts(page, ".message.assistant")) == 2


def test_temperature_and_top_k_controls_are_sent(page):
    page.fill("#temperature", "0.3")
    page.fill("#top-k", "7")
    with page.expect_request("**/chat/completions") as request:
        send(page, "settings")
    body = request.value.post_data_json
    assert body["temperature"] == 0.3 and body["top_k"] == 7


def test_an_unreachable_server_gives_a_clear_message(page):
    page.route("**/chat/completions", lambda route: route.abort())
    page.fill("#input", "anyone?")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.error", timeout=TIMEOUT_MS)
    assert "Cannot reach the nanochat server" in page.text_content(".message.error")
    assert "unreachable" in page.text_content("#status")


def test_a_server_error_is_shown(page):
    page.fill("#temperature", "5")  # the page clamps to 2; a too long message is refused by the server instead
    page.fill("#input", "x" * 8001)
    page.press("#input", "Enter")
    page.wait_for_selector(".message.error", timeout=TIMEOUT_MS)
    assert "at most 8000 characters" in page.text_content(".message.error")
