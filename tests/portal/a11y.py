"""Accessibility basics checked in the page itself: labels, headings, names, alt text, contrast.

``accessibility_problems(page)`` runs the checks in Chromium and returns one line per problem;
``check_page(page)`` fails the test when there is any. The checks, in document order:

- every form control (``input`` but hidden, submit, reset and button inputs; ``select``; ``textarea``)
  has a label: ``label[for]`` or a wrapping ``label`` with text of its own, ``aria-label``, or
  ``aria-labelledby`` naming elements with text;
- exactly one rendered ``h1``, and heading levels never skip one going down (the first heading is h1);
- every ``svg[role=img]`` has a name (``aria-labelledby`` resolving to text, or ``aria-label``);
- every ``img`` and ``input[type=image]`` has ``alt``; ``html`` has ``lang``;
- every rendered text has WCAG AA contrast with its background: 4.5:1, 3:1 for large text (24px, or
  18.66px bold). The background is the first opaque ``background-color`` up the ancestors (translucent
  ones composited, white below all; SVG shapes behind SVG text are not seen); text over a
  ``background-image`` is a problem, as its contrast cannot be known; ``opacity`` fades the text;
- every SVG element of class ``point`` (a chart's data point) has a solid fill with 3:1 contrast against
  its chart's background (white unless the page sets one), as WCAG asks of graphical objects.
"""

from __future__ import annotations

from playwright.sync_api import Page

SCRIPT = r"""
() => {
  const problems = [];
  const textOf = (el) => (el.textContent || '').replace(/\s+/g, ' ').trim();
  const quote = (text) => JSON.stringify(text.length > 40 ? text.slice(0, 39) + '…' : text);
  const describe = (el) => {
    let tag = '<' + el.tagName.toLowerCase();
    for (const name of ['id', 'name', 'type', 'class']) {
      const value = el.getAttribute(name);
      if (value) tag += ` ${name}="${value}"`;
    }
    return tag + '>';
  };
  const labelledBy = (el) => (el.getAttribute('aria-labelledby') || '').split(/\s+/)
    .map((id) => id && document.getElementById(id)).filter(Boolean).map(textOf).join(' ').trim();
  const ariaName = (el) => (el.getAttribute('aria-label') || '').trim() || labelledBy(el);
  const rendered = (el) => el.getClientRects().length > 0;

  if (!(document.documentElement.getAttribute('lang') || '').trim()) problems.push('<html> has no lang');

  const unlabelledTypes = ['hidden', 'submit', 'reset', 'button', 'image'];
  for (const control of document.querySelectorAll('input, select, textarea')) {
    if (control.tagName === 'INPUT' && unlabelledTypes.includes(control.type)) continue;
    // A wrapping label's text includes the control's own (a select's options): count only the label's.
    const labelText = [...control.labels].map((label) => {
      const copy = label.cloneNode(true);
      copy.querySelectorAll('input, select, textarea').forEach((inner) => inner.remove());
      return textOf(copy);
    }).join(' ').trim();
    if (!labelText && !ariaName(control)) problems.push(`form control ${describe(control)} has no label`);
  }

  const headings = [...document.querySelectorAll('h1, h2, h3, h4, h5, h6')].filter(rendered);
  const h1s = headings.filter((heading) => heading.tagName === 'H1');
  if (h1s.length !== 1) {
    problems.push(`the page has ${h1s.length} h1 headings, not one` +
      (h1s.length ? ': ' + h1s.map((h1) => quote(textOf(h1))).join(', ') : ''));
  }
  let previous = null;
  for (const heading of headings) {
    const level = Number(heading.tagName[1]);
    const previousLevel = previous ? Number(previous.tagName[1]) : 0;
    if (level > previousLevel + 1) {
      const after = previous ? `h${previousLevel} ${quote(textOf(previous))}` : 'the start of the page';
      problems.push(`heading h${level} ${quote(textOf(heading))} follows ${after}: a level is skipped`);
    }
    previous = heading;
  }

  for (const svg of document.querySelectorAll('svg[role="img"]')) {
    if (!ariaName(svg)) problems.push(`chart ${describe(svg)} has no accessible name`);
  }

  for (const image of document.querySelectorAll('img:not([alt]), input[type="image"]:not([alt])')) {
    problems.push(`image ${describe(image)} has no alt`);
  }

  // Colours as [r, g, b, alpha]; other colour spaces (oklch(), color()) converted to sRGB by a canvas.
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = 1;
  const context = canvas.getContext('2d', { willReadFrequently: true });
  const rgba = (css) => {
    const match = css.match(/^rgba?\(([\d.]+),\s*([\d.]+),\s*([\d.]+)(?:,\s*([\d.]+))?\)$/);
    if (match) return [+match[1], +match[2], +match[3], match[4] === undefined ? 1 : +match[4]];
    context.clearRect(0, 0, 1, 1);
    context.fillStyle = css;
    context.fillRect(0, 0, 1, 1);
    const [r, g, b, a] = context.getImageData(0, 0, 1, 1).data;
    return [r, g, b, a / 255];
  };
  const over = (top, below) => [0, 1, 2].map((i) => top[i] * top[3] + below[i] * (1 - top[3])).concat(1);
  const hex = (colour) => '#' + colour.slice(0, 3)
    .map((c) => Math.round(c).toString(16).padStart(2, '0')).join('');
  const luminance = (colour) => {
    const [r, g, b] = colour.slice(0, 3).map((c) => {
      const s = c / 255;
      return s <= 0.04045 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const contrast = (a, b) => {
    const [light, dark] = [luminance(a), luminance(b)].sort((x, y) => y - x);
    return (light + 0.05) / (dark + 0.05);
  };
  // The opaque colour behind el, or null when a background image is behind it.
  const backgroundOf = (el) => {
    const layers = [];
    for (let node = el; node; node = node.parentElement) {
      const style = getComputedStyle(node);
      if (style.backgroundImage !== 'none') return null;
      const colour = rgba(style.backgroundColor);
      if (colour[3] > 0) layers.push(colour);
      if (colour[3] >= 1) break;
    }
    return layers.reverse().reduce((below, layer) => over(layer, below), [255, 255, 255, 1]);
  };
  const opacityOf = (el) => {
    let opacity = 1;
    for (let node = el; node; node = node.parentElement) opacity *= Number(getComputedStyle(node).opacity);
    return opacity;
  };
  // The colour el paints with, composited on its background, or a reason it cannot be known.
  const paint = (el, css, alpha) => {
    if (css === 'none' || css.startsWith('url(')) return { unknown: `it is painted with ${css}` };
    const background = backgroundOf(el);
    if (!background) return { unknown: 'it is over a background image' };
    const colour = rgba(css);
    colour[3] *= alpha * opacityOf(el);
    return { colour: over(colour, background), background };
  };
  const ratioText = (ratio) => (Math.floor(ratio * 100) / 100).toFixed(2) + ':1';

  const seen = new Set();
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!node.data.trim() || !el || seen.has(el)) continue;
    seen.add(el);
    if (el.closest('script, style, noscript, template, title, desc')) continue;
    const style = getComputedStyle(el);
    const box = el.getBoundingClientRect();
    // Unrendered, invisible, or clipped to a pixel for screen readers only.
    if (!rendered(el) || style.visibility !== 'visible' || box.width <= 1 || box.height <= 1) continue;
    const inSvg = el instanceof SVGElement;
    const painted = paint(el, inSvg ? style.fill : style.color, inSvg ? Number(style.fillOpacity) : 1);
    const what = `text ${quote(textOf(el))} in ${describe(el)}`;
    if (painted.unknown) {
      problems.push(`${what} has a contrast that cannot be checked: ${painted.unknown}`);
      continue;
    }
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    const needed = large ? 3 : 4.5;
    const ratio = contrast(painted.colour, painted.background);
    if (ratio < needed) {
      problems.push(`${what} has contrast ${ratioText(ratio)} (${hex(painted.colour)} on ` +
        `${hex(painted.background)}), needs ${needed}:1`);
    }
  }

  for (const point of document.querySelectorAll('svg .point')) {
    const style = getComputedStyle(point);
    const painted = paint(point, style.fill, Number(style.fillOpacity));
    if (painted.unknown) {
      problems.push(`chart point ${describe(point)} has a contrast that cannot be checked: ` +
        painted.unknown);
      continue;
    }
    const ratio = contrast(painted.colour, painted.background);
    if (ratio < 3) {
      problems.push(`chart point ${describe(point)} has contrast ${ratioText(ratio)} ` +
        `(${hex(painted.colour)} on ${hex(painted.background)}), needs 3:1`);
    }
  }
  return problems;
}
"""


def accessibility_problems(page: Page) -> list[str]:
    """Check the page as it is rendered now; one line per problem, none when it passes."""
    problems = page.evaluate(SCRIPT)
    assert isinstance(problems, list)
    return [str(problem) for problem in problems]


def check_page(page: Page) -> None:
    """Fail with every accessibility problem of the page, one a line, when it has any."""
    problems = accessibility_problems(page)
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise AssertionError(f"{len(problems)} accessibility problem(s) on {page.url}:\n{listed}")
