"""What the browser tests share: a headless Debian chromium, axe-core run on a page
(WCAG 2.0/2.1/2.2 A and AA), the sideways-scroll check at a phone's width and at 200% zoom,
screenshots, and moving about a page by keyboard alone.

Nothing here runs on import: a test script makes a `Browser` and calls it. Every check
prints one line when it passes; the first failure prints `FAIL: …` and exits non-zero.
Used by `browser.py` (the provider inbox) and `refer_browser.py` (the self-referral page).
"""

import base64
import hashlib
import hmac
import json
import struct
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

# The axe-core rules that are run: WCAG 2.0, 2.1 and 2.2, levels A and AA.
TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]

# The desktop window; a phone's width; and 200% zoom of the desktop (1280 px / 2).
DESKTOP = (1280, 1000)
NARROW = [(375, "phone width"), (640, "200% zoom")]


def totp(secret, at=None):
    """RFC 6238: HMAC-SHA1 over the 30-second step, 6 digits."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    step = int((at or time.time()) // 30)
    mac = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    off = mac[-1] & 15
    n = struct.unpack(">I", mac[off : off + 4])[0] & 0x7FFFFFFF
    return f"{n % 1_000_000:06d}"


def fail(msg):
    """Says what failed and stops the script (exit status 1)."""
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def chromium(width=DESKTOP[0], height=DESKTOP[1]):
    """A headless Debian chromium (/usr/bin/chromium) driven by its chromedriver."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
              "--disable-gpu", "--no-first-run", "--lang=en-GB"]:
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(30)
    return driver


def by_id(i):
    """A predicate for `tab_to`: the element with this id."""
    return lambda el: el.get_attribute("id") == i


def button(text):
    """A predicate for `tab_to`: the button that reads `text`."""
    return lambda el: el.tag_name == "button" and el.text.strip() == text


def link_to(href_part):
    """A predicate for `tab_to`: a link whose href contains `href_part`."""
    return lambda el: el.tag_name == "a" and href_part in (el.get_attribute("href") or "")


class Browser:
    """One chromium window on the gateway at `base`, with axe-core's source (`axe_js`, the
    path of axe.min.js) ready to inject. `checked` lists every page axe has passed."""

    def __init__(self, base, axe_js, shots):
        self.base = base
        self.shots = shots
        with open(axe_js, encoding="utf-8") as f:
            self.axe_source = f.read()
        self.driver = chromium()
        self.checked = []

    def quit(self):
        self.driver.quit()

    # --- axe-core ------------------------------------------------------------------------

    def _run_axe(self):
        """axe-core's result for the page as it is now (injected afresh: pages reload)."""
        self.driver.execute_script(self.axe_source)
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {runOnly: {type: 'tag', values: %s}}).then(r => done(r))"
            ".catch(e => done({error: String(e)}));" % json.dumps(TAGS)
        )

    def axe(self, label):
        """axe-core on the page: no violations, or a failure naming each rule and an element."""
        result = self._run_axe()
        if "error" in result:
            fail(f"axe on {label}: {result['error']}")
        v = result["violations"]
        if v:
            detail = "; ".join(f"{x['id']} ({len(x['nodes'])}): {x['help']} e.g. {x['nodes'][0]['html'][:120]}" for x in v)
            fail(f"axe on {label}: {len(v)} violations: {detail}")
        self.checked.append(label)
        print(f"axe ok: {label} ({len(result['passes'])} rules passed)", flush=True)

    def axe_finds_a_planted_fault(self):
        """A control: axe must report an image with no text alternative, or it checks nothing.
        (It changes the page: load another before checking anything else.)"""
        self.driver.execute_script("const i = document.createElement('img'); i.src = '/assets/x.svg';"
                                   "document.querySelector('main').appendChild(i);")
        r = self._run_axe()
        if not any(v["id"] == "image-alt" for v in r.get("violations", [])):
            fail("axe did not report a planted image without alt text: it is not checking")
        print("axe control ok: a planted fault is reported", flush=True)

    # --- layout --------------------------------------------------------------------------

    def no_sideways_scroll(self, label):
        """At a phone's width and at 200% zoom the page fits its width, and passes axe."""
        for width, what in NARROW:
            self.driver.set_window_size(width, 900)
            time.sleep(0.2)
            sw = self.driver.execute_script("return document.documentElement.scrollWidth")
            cw = self.driver.execute_script("return document.documentElement.clientWidth")
            if sw > cw + 1:
                fail(f"{label} at {what}: scrolls sideways ({sw} > {cw})")
            self.axe(f"{label} at {what}")
        self.driver.set_window_size(*DESKTOP)

    def screenshot(self, name, full_page=False):
        """Saves the window as `shots/name` (PNG); with `full_page`, the whole page's length
        (the window is made as tall as the page, then put back). Returns the path."""
        path = f"{self.shots}/{name}"
        if full_page:
            tall = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(DESKTOP[0], max(DESKTOP[1], tall + 150))
            time.sleep(0.2)
        ok = self.driver.save_screenshot(path)
        if full_page:
            self.driver.set_window_size(*DESKTOP)
        if not ok:
            fail(f"could not save the screenshot {path}")
        return path

    # --- the keyboard --------------------------------------------------------------------

    def focused(self):
        return self.driver.switch_to.active_element

    def tab_to(self, predicate, what, limit=80):
        """Presses Tab until the focused element satisfies predicate (keyboard only)."""
        for _ in range(limit):
            self.focused().send_keys(Keys.TAB)
            el = self.focused()
            if predicate(el):
                return el
        fail(f"Tab never reached {what}")

    def type_into(self, field_id, text):
        """Tabs to the field, selects what it holds and types `text` over it."""
        el = self.tab_to(by_id(field_id), f"#{field_id}")
        el.send_keys(Keys.CONTROL, "a")
        el.send_keys(text)
        return el

    def press(self, label):
        """Tabs to the button that reads `label` and presses Enter."""
        self.tab_to(button(label), f"button '{label}'").send_keys(Keys.ENTER)
        time.sleep(0.3)

    def from_top(self, where):
        """Keyboard from the top of the page as it is: the first Tab lands on the skip link."""
        self.driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        first = self.focused()
        if "Skip to main content" not in first.text:
            fail(f"the first Tab on {where} is not the skip link: {first.text!r}")

    def start_at(self, path):
        """Opens `path` and starts at the top of it by keyboard."""
        self.driver.get(self.base + path)
        self.from_top(path)
