// Shared by every dashboard page: the JSON API call, the live stream, formatting.
// Every change goes through the documented JSON API with a same-origin fetch.
"use strict";

const Batmon = (() => {
  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  /** Call the JSON API; resolve to its `success`, reject with its `error` sentence. */
  async function api(path, fields = {}, method = "POST") {
    const options = {
      method,
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    };
    let url = path;
    if (method === "GET") {
      const query = new URLSearchParams(fields).toString();
      if (query) url += "?" + query;
    } else {
      // JSON: a cross-origin page could not send this without a CORS preflight we never grant.
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(fields);
    }
    const response = await fetch(url, options);
    let body;
    try {
      body = await response.json();
    } catch (e) {
      throw new ApiError(`The server answered ${response.status} without JSON.`, response.status);
    }
    if (!response.ok || body.error !== undefined) {
      // A session that ended (logged out elsewhere, user deleted): back to the login form.
      if (response.status === 401 && document.body.dataset.page !== "login") window.location.assign("/");
      throw new ApiError(body.error || `HTTP ${response.status}`, response.status);
    }
    return body.success;
  }

  /** Show a form's outcome in its role=status paragraph. */
  function say(element, text, kind = "ok") {
    if (!element) return;
    element.textContent = text;
    element.dataset.kind = kind;
  }

  function formatNumber(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    const abs = Math.abs(value);
    const digits = abs >= 100 ? 1 : abs >= 10 ? 2 : 3;
    return String(Number(value.toFixed(digits)));
  }

  function withUnit(value, unit) {
    const text = formatNumber(value);
    if (!unit) return text;
    return unit === "%" ? text + "%" : text + " " + unit;
  }

  // Decimals per metric, in its default unit: V 2, A 2 below 10 A else 1, W 0, % 1 only
  // when not whole. A batmon's own unit (mV, kW...) keeps the general rule above.
  const DEFAULT_UNITS = { voltage: "V", current: "A", power: "W", soc: "%" };
  const DECIMALS = {
    voltage: () => 2,
    current: (v) => (Math.abs(v) < 10 ? 2 : 1),
    power: () => 0,
    soc: (v) => (Math.abs(v - Math.round(v)) < 0.05 ? 0 : 1),
  };

  /** A metric's value as a person reads it: its decimals and unit; "—" when there is none. */
  function formatMetric(value, metric, unit) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    if (unit !== DEFAULT_UNITS[metric] || !DECIMALS[metric]) return withUnit(value, unit);
    let text = value.toFixed(DECIMALS[metric](value));
    if (/^-0(\.0*)?$/.test(text)) text = text.slice(1); // no "-0 W"
    return unit === "%" ? text + "%" : text + " " + unit;
  }

  /**
   * Show one value of a batmon (a live-stream or page snapshot) in ``el``: "—" when it
   * was never reported, else the value, marked stale when the latest reading left it
   * out. ``data-state`` says which (never, stale, fresh); ``reported`` is null for a
   * value never reported, and absent (nothing known, show the value) on an old server.
   */
  function showValue(el, b, metric, text) {
    const reported = b.reported ? b.reported[metric] : undefined;
    const never = b.last_reading === null || reported === null;
    const stale = !never && Array.isArray(b.stale) && b.stale.includes(metric);
    el.dataset.state = never ? "never" : stale ? "stale" : "fresh";
    el.replaceChildren();
    if (never) {
      const dash = document.createElement("span");
      dash.setAttribute("aria-hidden", "true");
      dash.textContent = "—";
      el.append(dash, srText("never reported"));
      el.title = "Never reported";
      return;
    }
    el.append(text);
    if (stale) {
      const mark = document.createElement("span");
      mark.className = "stale-mark";
      mark.textContent = "stale";
      const when = reported ? `last reported ${age(reported)}, ${timeText(reported)}` : "older";
      mark.title = el.title = `Not in the latest reading: ${when}`;
      el.append(" ", mark, srText(`(${when})`));
    } else {
      el.removeAttribute("title");
    }
  }

  function srText(text) {
    const span = document.createElement("span");
    span.className = "sr-only";
    span.textContent = text;
    return span;
  }

  /** showValue for voltage, current, power or SoC, with its decimals and unit. */
  function showMetric(el, b, metric) {
    showValue(el, b, metric, formatMetric(b["batmon_" + metric], metric, b.units[metric]));
  }

  // Ages are measured on the server's clock: a phone whose clock is off still reads right.
  const serverNow = Number(document.body.dataset.serverNow);
  const clockOffset = serverNow ? serverNow - Date.now() / 1000 : 0;

  /** Epoch seconds now, by the server's clock. */
  function serverTime() {
    return Date.now() / 1000 + clockOffset;
  }

  /** "12 s ago", "3 min ago", "never": how old the latest reading is. */
  function age(epoch, now = serverTime()) {
    if (epoch === null || epoch === undefined || epoch === "") return "never";
    const s = Math.max(0, Math.round(now - Number(epoch)));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function timeText(epoch) {
    return epoch === null || epoch === undefined ? "–" : new Date(epoch * 1000).toLocaleString();
  }

  /** Refresh every `.age[data-epoch]` once a second: a local clock, no request. */
  function tickAges() {
    const update = () => {
      for (const el of document.querySelectorAll(".age[data-epoch]")) {
        const text = age(el.dataset.epoch === "" ? null : el.dataset.epoch);
        if (el.textContent !== text) el.textContent = text;
        el.title = el.dataset.epoch ? timeText(Number(el.dataset.epoch)) : "";
      }
    };
    update();
    window.setInterval(update, 1000);
  }

  /**
   * One EventSource per page. Events: `snapshot` (every batmon of the user: first on
   * each connection, so a reconnect catches up, and after a burst too big to itemise),
   * `batmon` (one batmon's new state) and `deleted`. The browser reconnects by itself.
   */
  function live(handlers) {
    const state = document.getElementById("live-state");
    const show = (name, text) => {
      if (!state) return;
      state.dataset.state = name;
      state.textContent = "Live updates: " + text;
    };
    const source = new EventSource("/events", { withCredentials: true });
    source.addEventListener("open", () => show("open", "on"));
    source.addEventListener("error", () => {
      show("retrying", source.readyState === EventSource.CLOSED ? "off (reload the page)" : "reconnecting…");
    });
    source.addEventListener("snapshot", (e) => handlers.snapshot(JSON.parse(e.data)));
    source.addEventListener("batmon", (e) => handlers.batmon(JSON.parse(e.data)));
    source.addEventListener("deleted", (e) => handlers.deleted(JSON.parse(e.data)));
    // Banks: a page that shows them says so with these handlers (the server sends "banks"
    // after a snapshot, "bank" when a bank's values, members or alarms changed).
    for (const name of ["banks", "bank", "bank_deleted"]) {
      if (handlers[name]) source.addEventListener(name, (e) => handlers[name](JSON.parse(e.data)));
    }
    window.addEventListener("pagehide", () => source.close());
    return source;
  }

  /** An alarm's state in words: Disabled, OK, or since when it is triggered (and acknowledged). */
  function alarmState(a) {
    if (!a.alarm_enabled) return "Disabled";
    if (!a.alarm_triggered) return "OK";
    const since = `Triggered ${timeText(a.alarm_trigger_time)}`;
    return a.alarm_akn === null ? since : `${since}, acknowledged ${timeText(a.alarm_akn)}`;
  }

  function initialJson(id) {
    const el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  /** A form's named fields as strings, blanks left out. */
  function formFields(form) {
    const fields = {};
    for (const el of form.elements) {
      if (!el.name || el.type === "submit" || el.type === "button") continue;
      if (el.type === "checkbox") fields[el.name] = el.checked;
      else if (el.value.trim() !== "") fields[el.name] = el.value.trim();
    }
    return fields;
  }

  function setupLogout() {
    const button = document.getElementById("logout");
    if (!button) return;
    button.addEventListener("click", async () => {
      await api("/interface/logout");
      window.location.assign("/");
    });
  }

  setupLogout();
  return {
    api, ApiError, say, serverTime, formatNumber, withUnit, formatMetric, showValue, showMetric,
    age, timeText, tickAges, live, initialJson, formFields, alarmState, DEFAULT_UNITS,
  };
})();
