"""The provider inbox in a real browser (Debian chromium, driven by selenium), by keyboard
alone, with axe-core run on every page.

Usage: browser.py BASE EMAIL PASSWORD TOTP_SECRET TASK_ID AXE_JS SCREENSHOT_DIR

Signs in (password, then the TOTP code), finds the referral in the queue, opens it, accepts
it, records a contact, records SWEMWBS 99 (and checks the message beside the field), then
24, and completes it. Every page is checked with axe-core (WCAG 2.0/2.1/2.2 A and AA): no
violations. The queue and the referral are also checked at a phone's width and at 200%
zoom (1280 px / 2): no sideways scrolling. Screenshots of the queue and the referral are
written to SCREENSHOT_DIR. Prints one line per check; exits non-zero on the first failure.
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

BASE, EMAIL, PASSWORD, SECRET, TASK, AXE_JS, SHOTS = sys.argv[1:8]
AXE = open(AXE_JS, encoding="utf-8").read()
TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]


def totp(secret, at=None):
    """RFC 6238: HMAC-SHA1 over the 30-second step, 6 digits."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    step = int((at or time.time()) // 30)
    mac = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    off = mac[-1] & 15
    n = struct.unpack(">I", mac[off : off + 4])[0] & 0x7FFFFFFF
    return f"{n % 1_000_000:06d}"


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
          "--disable-gpu", "--no-first-run", "--lang=en-GB"]:
    opts.add_argument(a)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
driver.set_page_load_timeout(30)
checked = []


def axe(label):
    driver.execute_script(AXE)
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: {type: 'tag', values: %s}}).then(r => done(r))"
        ".catch(e => done({error: String(e)}));" % json.dumps(TAGS)
    )
    if "error" in result:
        fail(f"axe on {label}: {result['error']}")
    v = result["violations"]
    if v:
        detail = "; ".join(f"{x['id']} ({len(x['nodes'])}): {x['help']} e.g. {x['nodes'][0]['html'][:120]}" for x in v)
        fail(f"axe on {label}: {len(v)} violations: {detail}")
    checked.append(label)
    print(f"axe ok: {label} ({len(result['passes'])} rules passed)", flush=True)


def no_sideways_scroll(label):
    for width, what in [(375, "phone width"), (640, "200% zoom")]:
        driver.set_window_size(width, 900)
        time.sleep(0.2)
        sw = driver.execute_script("return document.documentElement.scrollWidth")
        cw = driver.execute_script("return document.documentElement.clientWidth")
        if sw > cw + 1:
            fail(f"{label} at {what}: scrolls sideways ({sw} > {cw})")
        axe(f"{label} at {what}")
    driver.set_window_size(1280, 1000)


def focused():
    return driver.switch_to.active_element


def tab_to(predicate, what, limit=80):
    """Presses Tab until the focused element satisfies predicate (keyboard only)."""
    for _ in range(limit):
        focused().send_keys(Keys.TAB)
        el = focused()
        if predicate(el):
            return el
    fail(f"Tab never reached {what}")


def by_id(i):
    return lambda el: el.get_attribute("id") == i


def button(text):
    return lambda el: el.tag_name == "button" and el.text.strip() == text


def type_into(field_id, text):
    el = tab_to(by_id(field_id), f"#{field_id}")
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(text)


def press(label):
    tab_to(button(label), f"button '{label}'").send_keys(Keys.ENTER)
    time.sleep(0.3)


def start_at(path):
    driver.get(BASE + path)
    # Keyboard from the top of the page: the first Tab lands on the skip link.
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    first = focused()
    if "Skip to main content" not in first.text:
        fail(f"the first Tab on {path} is not the skip link: {first.text!r}")


def axe_finds_a_planted_fault():
    """A control: axe must report an image with no text alternative, or it checks nothing."""
    driver.execute_script(AXE)
    driver.execute_script("const i = document.createElement('img'); i.src = '/assets/x.svg';"
                          "document.querySelector('main').appendChild(i);")
    r = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: {type: 'tag', values: %s}}).then(r => done(r));" % json.dumps(TAGS))
    if not any(v["id"] == "image-alt" for v in r["violations"]):
        fail("axe did not report a planted image without alt text: it is not checking")
    print("axe control ok: a planted fault is reported", flush=True)


try:
    driver.get(BASE + "/inbox/sign-in")
    axe_finds_a_planted_fault()
    start_at("/inbox")
    if "/inbox/sign-in" not in driver.current_url:
        fail("the queue did not send an unsigned browser to sign in")
    axe("sign-in")
    type_into("email", EMAIL)
    type_into("password", PASSWORD)
    press("Continue")
    if "/inbox/sign-in/code" not in driver.current_url:
        fail(f"password step went to {driver.current_url}")
    axe("security code")
    # A wrong code first: the message is beside the field, and the page still passes axe.
    focused().send_keys(Keys.TAB)
    type_into("code", "000000")
    press("Continue")
    if "code-error" not in driver.page_source:
        fail("a wrong code shows no message beside the field")
    axe("security code, wrong code")
    type_into("code", totp(SECRET))
    press("Continue")
    if not driver.current_url.rstrip("/").endswith("/inbox"):
        fail(f"code step went to {driver.current_url}")

    axe("queue")
    if "Ada Example" not in driver.page_source:
        fail("the queue does not show the routed referral")
    driver.save_screenshot(f"{SHOTS}/queue.png")
    no_sideways_scroll("queue")
    start_at("/inbox")
    link = tab_to(lambda el: el.tag_name == "a" and TASK in (el.get_attribute("href") or ""), "the referral's link")
    link.send_keys(Keys.ENTER)
    time.sleep(0.3)
    if TASK not in driver.current_url:
        fail("Enter on the referral's link did not open it")
    axe("referral (new)")
    if "<script>alert" not in driver.find_element(By.TAG_NAME, "main").text:
        fail("the GP's notes (which hold markup) are not shown as text")
    driver.save_screenshot(f"{SHOTS}/referral.png")
    no_sideways_scroll("referral")

    start_at(f"/inbox/referrals/{TASK}")
    press("Accept this referral")
    if "You accepted this referral" not in driver.page_source:
        fail("accept did not say it was done")
    axe("referral (accepted)")

    start_at(f"/inbox/referrals/{TASK}")
    type_into("contact-date", "21/11/2026")
    el = tab_to(by_id("contact-attempted"), "the contact radios")
    el.send_keys(Keys.ARROW_DOWN)  # radios move by arrow keys
    if not driver.find_element(By.ID, "contact-made").is_selected():
        fail("arrow key did not choose 'We spoke to them'")
    press("Record contact")
    if "Contact recorded" not in driver.page_source:
        fail("contact was not recorded")

    start_at(f"/inbox/referrals/{TASK}")
    type_into("score", "99")
    press("Record score")
    err = driver.find_elements(By.ID, "score-error")
    if not err or "from 7 to 35" not in err[0].text:
        fail("score 99 was not refused beside its field")
    axe("referral (score refused)")
    driver.save_screenshot(f"{SHOTS}/score-refused.png")
    type_into("score", "24")
    press("Record score")
    if "Score recorded" not in driver.page_source:
        fail("score 24 was not recorded")

    start_at(f"/inbox/referrals/{TASK}")
    press("Mark as complete")
    if "The referral is complete" not in driver.page_source:
        fail("complete did not say it was done")
    axe("referral (completed)")
    print(json.dumps({"ok": True, "pages_checked": checked}), flush=True)
finally:
    driver.quit()
