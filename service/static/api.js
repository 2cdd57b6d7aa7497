// The page's one way to call the service. With a token set, the service
// answers 401 until the token is typed in; it is kept in this tab's
// sessionStorage (never in the URL) and sent as a bearer token.

const TOKEN_KEY = "shardprop-token";

export class Unauthorized extends Error {}
export class HttpError extends Error {
  constructor(url, status) { super(`${url}: ${status}`); this.status = status; }
}

export function setToken(token) { sessionStorage.setItem(TOKEN_KEY, token.trim()); }

export async function getJSON(url) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const r = await fetch(url, { cache: "no-store", headers: token ? { Authorization: `Bearer ${token}` } : {} });
  document.getElementById("auth").hidden = r.status !== 401;
  if (r.status === 401) throw new Unauthorized(token ? "wrong token" : "this service needs its token");
  if (!r.ok) throw new HttpError(url, r.status);
  return r.json();
}

/** Run a page: `refresh()` now and again `pollMs` after each one ends; at
 *  once when a token is typed into the page's #auth form; and after a
 *  resize, `redraw()` (forget what was drawn) then `refresh()`. */
export function runPage(refresh, redraw, pollMs) {
  const byId = id => document.getElementById(id);
  byId("auth").addEventListener("submit", event => {
    event.preventDefault();
    setToken(byId("token").value);
    refresh();
  });
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => { redraw(); refresh(); }, 150);
  });
  const loop = async () => { await refresh(); setTimeout(loop, pollMs); };
  loop();
}
