// A small Markdown renderer for model output. It builds DOM nodes with createElement and
// textContent only: no string of the model's ever reaches innerHTML, so `<script>` or
// `<img onerror>` in a reply stays text. Links keep http(s)/mailto targets only.
// Covers what chat models write: paragraphs, headings, lists, quotes, fenced code, tables,
// rules, and inline code, bold, italic, strike-through, links. An unclosed code fence (a reply
// still streaming) runs to the end of the text.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,     // 1,2 code span
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source,              // 3 bold
  /__(?=\S)([\s\S]*?\S)__(?!\w)/.source,            // 4 bold
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source,          // 5 italic
  /(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source, // 6 italic
  /~~(?=\S)([\s\S]*?\S)~~/.source,                  // 7 strike-through
  /\[([^\]\n]+)\]\(\s*<?([^)\s>]+)>?\s*\)/.source,  // 8,9 link
  /(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"])/.source, // 10 bare URL
].join("|"));

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** The URL when it is safe to follow (http, https, mailto), else null. */
export function safeUrl(url) {
  try {
    const parsed = new URL(url, window.location.href);
    return ["http:", "https:", "mailto:"].includes(parsed.protocol) ? parsed.href : null;
  } catch {
    return null;
  }
}

function link(parent, text, url) {
  const href = safeUrl(url);
  if (href === null) {
    parent.append(text === url ? text : `${text} (${url})`);
    return;
  }
  const a = el("a", "", text);
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  parent.append(a);
}

/** Appends the inline Markdown of `text` to `parent`. */
export function renderInline(parent, text) {
  let rest = text;
  while (rest) {
    const m = INLINE.exec(rest);
    if (!m) {
      parent.append(rest);
      return;
    }
    if (m.index) parent.append(rest.slice(0, m.index));
    if (m[2] !== undefined) parent.append(el("code", "", m[2].replace(/^ (.*) $/s, "$1")));
    else if (m[3] !== undefined || m[4] !== undefined) renderInline(parent.appendChild(el("strong")), m[3] ?? m[4]);
    else if (m[5] !== undefined || m[6] !== undefined) renderInline(parent.appendChild(el("em")), m[5] ?? m[6]);
    else if (m[7] !== undefined) renderInline(parent.appendChild(el("del")), m[7]);
    else if (m[8] !== undefined) link(parent, m[8], m[9]);
    else link(parent, m[10], m[10]);
    rest = rest.slice(m.index + m[0].length);
  }
}

function inlineLines(parent, lines) {
  lines.forEach((line, i) => {
    if (i) parent.append(el("br"));
    renderInline(parent, line.trim());
  });
}

function codeBlock(lang, code) {
  const wrap = el("div", "code-block");
  const head = el("div", "code-head");
  head.append(el("span", "code-lang", lang || "text"));
  const copy = el("button", "copy-code", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => navigator.clipboard?.writeText(code).then(
    () => { copy.textContent = "Copied"; setTimeout(() => { copy.textContent = "Copy"; }, 1200); },
    () => { copy.textContent = "Copy failed"; }));
  head.append(copy);
  const pre = el("pre");
  const codeEl = el("code", lang ? `language-${lang}` : "", code);
  pre.append(codeEl);
  wrap.append(head, pre);
  return wrap;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(header, rows) {
  const t = el("table");
  const tr = t.appendChild(el("thead")).appendChild(el("tr"));
  splitRow(header).forEach((cell) => renderInline(tr.appendChild(el("th")), cell));
  const body = t.appendChild(el("tbody"));
  for (const row of rows) {
    const r = body.appendChild(el("tr"));
    splitRow(row).forEach((cell) => renderInline(r.appendChild(el("td")), cell));
  }
  const wrap = el("div", "table-wrap");
  wrap.append(t);
  return wrap;
}

function list(lines, start) {
  // Consecutive items of one kind; a line indented under an item continues it, deeper items nest.
  const first = ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  let i = start;
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    i++;
    while (i < lines.length && lines[i].trim() && !(ITEM.test(lines[i]) && ITEM.exec(lines[i])[1].length <= indent)
           && (/^\s/.test(lines[i]) || !startsBlock(lines, i))) {
      body.push(lines[i].replace(/^\s{1,4}/, ""));
      i++;
    }
    const li = node.appendChild(el("li"));
    li.append(render(body.join("\n"), true));
  }
  return [node, i];
}

function startsBlock(lines, i) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line)
    || (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-"));
}

/** A DocumentFragment rendering Markdown `text`; `tight` drops the paragraph of a single block (list items). */
export function render(text, tight = false) {
  const out = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let paragraph = [];
  const flush = () => {
    if (!paragraph.length) return;
    inlineLines(out.appendChild(el("p")), paragraph);
    paragraph = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      flush();
      i++;
    } else if ((m = FENCE.exec(line))) {
      flush();
      const fence = m[1];
      const body = [];
      i++;
      while (i < lines.length && !(lines[i].trim().startsWith(fence) && lines[i].trim().replace(/[`~]/g, "") === "")) {
        body.push(lines[i]);
        i++;
      }
      i++;  // the closing fence (past the end when the reply is still streaming)
      out.append(codeBlock(m[2], body.join("\n")));
    } else if ((m = HEADING.exec(line))) {
      flush();
      renderInline(out.appendChild(el(`h${m[1].length}`)), m[2]);
      i++;
    } else if (RULE.test(line)) {
      flush();
      out.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      flush();
      const body = [];
      while (i < lines.length && lines[i].trim() && QUOTE.test(lines[i])) body.push(lines[i++].replace(QUOTE, ""));
      out.appendChild(el("blockquote")).append(render(body.join("\n")));
    } else if (ITEM.test(line)) {
      flush();
      const [node, next] = list(lines, i);
      out.append(node);
      i = next;
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      flush();
      const header = line;
      i += 2;
      const rows = [];
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) rows.push(lines[i++]);
      out.append(table(header, rows));
    } else {
      paragraph.push(line);
      i++;
    }
  }
  flush();
  if (tight && out.childNodes.length === 1 && out.firstChild.tagName === "P") {
    const inner = document.createDocumentFragment();
    inner.append(...out.firstChild.childNodes);
    return inner;
  }
  return out;
}
