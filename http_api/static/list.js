// The batmon list: rows rendered by the server, then kept current by the live stream.
"use strict";
(() => {
  const METRICS = ["voltage", "current", "power", "soc"];
  const LABELS = { voltage: "Voltage", current: "Current", power: "Power", soc: "SoC" };
  const tbody = document.querySelector("#batmons tbody");
  const empty = document.getElementById("empty");

  function cell(label, className) {
    const td = document.createElement("td");
    td.dataset.label = label;
    if (className) td.className = className;
    return td;
  }

  function newRow(b) {
    const tr = document.createElement("tr");
    tr.dataset.batmonId = b.batmon_id;
    const th = document.createElement("th");
    th.scope = "row";
    th.dataset.label = "Name";
    const a = document.createElement("a");
    a.className = "name";
    a.href = `/batmon/${b.batmon_id}`;
    th.append(a);
    tr.append(th, cell("Type", "type"));
    const statusCell = cell("Status");
    const status = document.createElement("span");
    status.className = "status";
    statusCell.append(status);
    tr.append(statusCell);
    for (const m of METRICS) {
      const td = cell(LABELS[m], "num");
      td.dataset.metric = m;
      tr.append(td);
    }
    const ageCell = cell("Last reading", "age");
    ageCell.dataset.epoch = "";
    tr.append(ageCell, cell("Active alarms", "alarms"));
    tbody.append(tr);
    return tr;
  }

  /** The triggered ones of ``list`` as chips in ``el`` (a batmon's or a bank's); how many. */
  function showAlarms(el, list) {
    el.replaceChildren();
    const active = list.filter((a) => a.alarm_triggered);
    for (const a of active) {
      const chip = document.createElement("span");
      chip.className = "alarm-chip";
      chip.dataset.acknowledged = a.alarm_akn === null ? "no" : "yes";
      chip.textContent = a.alarm_name + (a.alarm_akn === null ? "" : " (acknowledged)");
      el.append(chip);
    }
    return active.length;
  }

  function render(b) {
    const tr = tbody.querySelector(`tr[data-batmon-id="${b.batmon_id}"]`) || newRow(b);
    tr.querySelector("a.name").textContent = b.batmon_name;
    tr.querySelector(".type").textContent = b.batmon_type;
    const status = tr.querySelector(".status");
    status.textContent = b.batmon_status;
    status.dataset.status = b.batmon_status;
    for (const m of METRICS) Batmon.showMetric(tr.querySelector(`[data-metric="${m}"]`), b, m);
    const ageCell = tr.querySelector(".age");
    ageCell.dataset.epoch = b.last_reading === null ? "" : String(b.last_reading);
    ageCell.textContent = Batmon.age(b.last_reading);
    const alarms = tr.querySelector(".alarms");
    if (!showAlarms(alarms, b.alarms)) {
      const none = document.createElement("span");
      none.className = "muted";
      none.textContent = "none";
      alarms.append(none);
    }
    tr.dataset.updated = String(Date.now());
    known.set(b.batmon_id, b);
    if (!added.has(b.batmon_id)) added.set(b.batmon_id, added.size);
    empty.hidden = true;
  }

  function remove(batmonId) {
    const tr = tbody.querySelector(`tr[data-batmon-id="${batmonId}"]`);
    if (tr) tr.remove();
    known.delete(Number(batmonId));
    empty.hidden = tbody.rows.length > 0;
  }

  /** The whole list as the server has it now: update every row, drop the gone ones. */
  function snapshot(batmons) {
    const seen = new Set(batmons.map((b) => String(b.batmon_id)));
    for (const tr of [...tbody.rows]) if (!seen.has(tr.dataset.batmonId)) remove(tr.dataset.batmonId);
    for (const b of batmons) render(b);
    refresh();
  }

  // -- overview, search, filter and sort: all in the browser, over the batmons shown ----
  const known = new Map(); // batmon_id -> the latest snapshot
  // Ids are random, so "oldest first" is the order the server lists them in (new ones last).
  const added = new Map(); // batmon_id -> position
  const tools = document.getElementById("list-tools");
  const field = (name) => tools.elements[name];
  const reported = (b, m) => b.last_reading !== null && !(b.reported && b.reported[m] === null);
  const valueOf = (b, m) => (reported(b, m) ? b["batmon_" + m] : null);
  const active = (b) => b.alarms.some((a) => a.alarm_triggered);

  /** Across every batmon, whatever the filter: total power and lowest SoC of the Online ones
   * (an Offline batmon's values are old), in W and % only (other units do not add up). */
  function overview() {
    const all = [...known.values()];
    const online = all.filter((b) => b.batmon_status === "Online");
    const powers = online.filter((b) => b.units.power === "W" && valueOf(b, "power") !== null);
    const socs = online.filter((b) => b.units.soc === "%" && valueOf(b, "soc") !== null);
    const show = (key, text) => {
      document.querySelector(`#overview [data-overview="${key}"]`).textContent = text;
    };
    show("count", `${all.length} · ${online.length} Online`);
    show("power", powers.length
      ? Batmon.formatMetric(powers.reduce((sum, b) => sum + b.batmon_power, 0), "power", "W") : "—");
    const lowest = socs.reduce((low, b) => (low === null || b.batmon_soc < low.batmon_soc ? b : low), null);
    show("soc", lowest ? `${Batmon.formatMetric(lowest.batmon_soc, "soc", "%")} (${lowest.batmon_name})` : "—");
    show("alarms", String(all.filter(active).length));
    document.getElementById("list-head").hidden = all.length === 0;
  }

  // Missing values sort last whichever the direction.
  const byNumber = (get, sign) => (a, b) => {
    const x = get(a), y = get(b);
    if (x === null || y === null) return (x === null) - (y === null);
    return sign * (x - y);
  };
  const SORTS = {
    "": (a, b) => added.get(a.batmon_id) - added.get(b.batmon_id),
    name: (a, b) => a.batmon_name.localeCompare(b.batmon_name, undefined, { sensitivity: "base", numeric: true }),
    status: (a, b) => (a.batmon_status === b.batmon_status ? 0 : a.batmon_status === "Offline" ? -1 : 1),
    soc: byNumber((b) => valueOf(b, "soc"), 1),
    "-soc": byNumber((b) => valueOf(b, "soc"), -1),
    power: byNumber((b) => valueOf(b, "power"), 1),
    "-power": byNumber((b) => valueOf(b, "power"), -1),
    recent: byNumber((b) => b.last_reading, -1),
  };

  function matches(b, query, show, socMax) {
    if (query && !`${b.batmon_name} ${b.batmon_type}`.toLowerCase().includes(query)) return false;
    if (show === "Online" || show === "Offline") { if (b.batmon_status !== show) return false; }
    else if (show === "alarm" && !active(b)) return false;
    else if (show === "never" && b.last_reading !== null) return false;
    if (socMax !== null && !(valueOf(b, "soc") !== null && b.batmon_soc <= socMax)) return false;
    return true;
  }

  /** Apply the search, filter and sort to the rows (they keep their own elements). */
  function arrange() {
    const query = field("q").value.trim().toLowerCase();
    const show = field("show").value;
    const socMax = field("soc_max").value === "" ? null : Number(field("soc_max").value);
    const sort = SORTS[field("sort").value] || SORTS[""];
    const order = [...known.values()].sort((a, b) => sort(a, b) || SORTS[""](a, b));
    let shown = 0;
    // Moving a row would take the keyboard focus out of it: keep the order while it is inside.
    const still = tbody.contains(document.activeElement);
    order.forEach((b, i) => {
      const tr = tbody.querySelector(`tr[data-batmon-id="${b.batmon_id}"]`);
      if (!still && tbody.rows[i] !== tr) tbody.insertBefore(tr, tbody.rows[i] || null);
      tr.hidden = !matches(b, query, show, socMax);
      if (!tr.hidden) shown += 1;
    });
    tbody.dataset.shown = String(shown);
    const filtered = shown !== order.length;
    document.getElementById("shown-count").textContent = filtered ? `${shown} of ${order.length} shown` : "";
    document.getElementById("none-match").hidden = !(order.length && shown === 0);
  }

  /** Keep the choices in the address, so a reload or a bookmark shows the same list. */
  function remember() {
    const params = new URLSearchParams();
    for (const name of ["q", "show", "soc_max", "sort"]) {
      if (field(name).value.trim() !== "") params.set(name, field(name).value.trim());
    }
    const query = params.toString();
    window.history.replaceState(null, "", query ? `?${query}` : window.location.pathname);
  }

  function refresh() {
    overview();
    arrange();
  }

  const params = new URLSearchParams(window.location.search);
  for (const name of ["q", "show", "soc_max", "sort"]) if (params.has(name)) field(name).value = params.get(name);
  tools.addEventListener("input", () => { arrange(); remember(); });
  tools.addEventListener("submit", (event) => event.preventDefault());
  document.getElementById("clear-find").addEventListener("click", () => {
    tools.reset();
    arrange();
    remember();
    field("q").focus();
  });

  for (const b of Batmon.initialJson("initial-batmons") || []) render(b);
  refresh();
  Batmon.tickAges();
  Batmon.live({
    snapshot,
    batmon: (b) => { render(b); refresh(); },
    deleted: (d) => { remove(d.batmon_id); refresh(); },
    banks: (all) => {
      const seen = new Set(all.map((k) => String(k.bank_id)));
      for (const li of document.querySelectorAll("#banks li[data-bank-id]")) if (!seen.has(li.dataset.bankId)) li.remove();
      for (const k of all) renderBank(k);
    },
    bank: renderBank,
    bank_deleted: (d) => {
      const li = document.querySelector(`#banks li[data-bank-id="${d.bank_id}"]`);
      if (li) li.remove();
    },
  });

  // -- banks: each entry's status, SoC, power and active alarms, kept current by the stream --
  /** Update a bank's entry from a bank object (/interface/bank/list, or the stream); a bank
   * added in another tab shows after a reload, with its members' names. */
  function renderBank(k) {
    const li = document.querySelector(`#banks li[data-bank-id="${k.bank_id}"]`);
    if (!li) return;
    li.querySelector(".bank-name").textContent = k.bank_name;
    const status = li.querySelector(".status");
    status.textContent = k.bank_status;
    status.dataset.status = k.bank_status;
    for (const el of li.querySelectorAll("[data-bank-value]")) {
      const key = el.dataset.bankValue;
      el.textContent = Batmon.formatMetric(k[key], key.replace(/^bank_/, ""), el.dataset.unit);
    }
    showAlarms(li.querySelector(".bank-alarms"), k.alarms || []);
    li.dataset.updated = String(Date.now());
  }
  for (const k of Batmon.initialJson("initial-banks") || []) renderBank(k);

  const bankForm = document.getElementById("bank-form");
  if (bankForm) {
    const bankStatus = bankForm.querySelector(".form-status");
    bankForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = bankForm.elements.bank_name.value.trim();
      const ids = [...bankForm.querySelectorAll('input[name="batmon_ids"]:checked')].map((el) => Number(el.value));
      if (!name || !ids.length) {
        Batmon.say(bankStatus, "Give the bank a name and tick at least one batmon.", "error");
        return;
      }
      try {
        const added = await Batmon.api("/interface/add/bank", { bank_name: name, batmon_ids: ids });
        window.location.assign(`/bank/${added.bank_id}`);
      } catch (e) {
        Batmon.say(bankStatus, e.message, "error");
      }
    });
  }

  const form = document.getElementById("add-form");
  const status = form.querySelector(".form-status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const fields = Batmon.formFields(form);
    if (!fields.batmon_name) {
      Batmon.say(status, "Give the batmon a name.", "error");
      form.elements.batmon_name.focus();
      return;
    }
    try {
      const added = await Batmon.api("/interface/add/batmon", fields);
      Batmon.say(status, `Added: batmon_id ${added.batmon_id}, batmon_token ${added.batmon_token} (also on its page).`);
      form.reset();
    } catch (e) {
      Batmon.say(status, e.message, "error");
    }
  });
})();
