"""Known-good and known-bad pages for the browser infrastructure's own tests, served by a real uvicorn.

Each bad page is the good one with one accessibility problem put in, so the checks must find exactly it.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

GOOD_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Usage</title>
<style>
  body { font-family: sans-serif; color: #222222; background: #ffffff; }
  .muted { color: #595959; }
  .banner { background: rgba(0, 0, 0, 0.8); color: #ffffff; padding: 4px; }
  .large { font-size: 24px; color: #949494; }
  .caption { color: oklch(40% 0 0); }
  .sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
  .tall { height: 1500px; }
</style>
</head>
<body>
<h1>Usage</h1>
<p class="banner">The period ends in 3 days.</p>
<h2>Calls</h2>
<svg role="img" aria-labelledby="calls-title" width="240" height="100">
  <title id="calls-title">Calls per hour</title>
  <circle class="point" cx="20" cy="50" r="4" fill="#1f5fa8"/>
  <circle class="point" cx="60" cy="30" r="4" fill="#1f5fa8"/>
  <text x="20" y="90" fill="#333333">hour</text>
</svg>
<h3>Table</h3>
<p class="muted">Windows never written read as zero.</p>
<p class="large">Projected invoice</p>
<p class="caption">Times are UTC.</p>
<span class="sr-only" style="color: #eeeeee">for screen readers</span>
<h2>Keys</h2>
<form method="post">
  <label for="name">Key name</label> <input id="name" name="name">
  <label>Environment <select name="env"><option>live</option><option>test</option></select></label>
  <input name="search" aria-label="Search keys">
  <span id="note-label">Note</span> <textarea name="note" aria-labelledby="note-label"></textarea>
  <input type="hidden" name="csrf" value="token">
  <button type="submit">Create</button>
</form>
<img src="data:image/gif;base64,R0lGODlhAQABAIAAAP///wAAACwAAAAAAQABAAACAkQBADs=" alt="">
<div class="tall"></div>
</body>
</html>
"""

# name: (what the good page holds, what the bad one holds instead)
CHANGES = {
    "unlabelled-input": ('<label for="name">Key name</label>', "<span>Key name</span>"),
    "label-without-text": ("<label>Environment <select", "<label><select"),
    "empty-labelledby": ('<span id="note-label">Note</span>', '<span id="note-label"></span>'),
    "skipped-heading": ("<h3>Table</h3>", "<h4>Table</h4>"),
    "two-h1": ("<h2>Keys</h2>", "<h1>Keys</h1>"),
    "heading-before-h1": ("<h1>Usage</h1>", "<h2>Account</h2>\n<h1>Usage</h1>"),
    "low-contrast-text": (".muted { color: #595959; }", ".muted { color: #949494; }"),
    "low-contrast-large-text": (
        ".large { font-size: 24px; color: #949494; }",
        ".large { font-size: 24px; color: #aaaaaa; }",
    ),
    "low-contrast-oklch-text": (".caption { color: oklch(40% 0 0); }", ".caption { color: oklch(80% 0 0); }"),
    "translucent-background": ("background: rgba(0, 0, 0, 0.8)", "background: rgba(0, 0, 0, 0.2)"),
    "faded-text": ('<p class="muted">', '<p class="muted" style="opacity: 0.5">'),
    "low-contrast-svg-text": ('fill="#333333">hour', 'fill="#bbbbbb">hour'),
    "low-contrast-point": ('cx="60" cy="30" r="4" fill="#1f5fa8"', 'cx="60" cy="30" r="4" fill="#9ecae1"'),
    "unnamed-svg": ('aria-labelledby="calls-title"', 'aria-labelledby="nothing"'),
    "image-without-alt": (' alt="">', ">"),
    "no-lang": ('<html lang="en">', "<html>"),
}
BAD_PAGES = {name: GOOD_PAGE.replace(good, bad) for name, (good, bad) in CHANGES.items()}


async def good(request: Request) -> Response:
    return HTMLResponse(GOOD_PAGE)


async def bad(request: Request) -> Response:
    return HTMLResponse(BAD_PAGES[request.path_params["name"]])


async def set_cookie(request: Request) -> Response:
    response = HTMLResponse(GOOD_PAGE)
    response.set_cookie("session", "secret", httponly=True, samesite="strict")
    return response


app = Starlette(
    routes=[Route("/", good), Route("/bad/{name}", bad), Route("/set-cookie", set_cookie)],
)
