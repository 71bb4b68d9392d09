// A bank's page: its values come from /interface/bank/status (the one place they are
// computed); the live stream only says when a member changed, then the page asks again.
"use strict";
(() => {
  const initial = Batmon.initialJson("initial-bank");
  const bankId = initial.bank_id;
  const members = new Map((Batmon.initialJson("initial-members") || []).map((b) => [b.batmon_id, b]));
  let bank = initial;
  const $ = (selector) => document.querySelector(selector);

  /** A bank value with its metric's decimals (bank_soc as soc...), "—" when there is none. */
  function text(value, unit, key = "") {
    return Batmon.formatMetric(value, key.replace(/^bank_/, ""), unit);
  }

  function render() {
    $("#bank-name").textContent = bank.bank_name;
    const status = $("#bank-status");
    status.textContent = bank.bank_status;
    status.dataset.status = bank.bank_status;
    for (const dd of document.querySelectorAll("#bank-values dd[data-value]")) {
      dd.textContent = text(bank[dd.dataset.value], dd.dataset.unit, dd.dataset.value);
    }
    const weighting = $("#weighting");
    weighting.dataset.weighting = bank.bank_soc_weighting;
    weighting.textContent = bank.bank_soc_weighting === "capacity"
      ? "SoC weighted by each Online member's capacity."
      : "SoC is the plain mean of the Online members: a capacity is unknown.";
    const offline = new Set(bank.offline_batmon_ids);
    const tbody = $("#members tbody");
    for (const tr of [...tbody.rows]) if (!bank.batmon_ids.includes(Number(tr.dataset.batmonId))) tr.remove();
    for (const id of bank.batmon_ids) {
      const m = members.get(id);
      if (!m) continue;
      let tr = tbody.querySelector(`tr[data-batmon-id="${id}"]`);
      if (!tr) tr = newRow(id, tbody);
      tbody.append(tr); // the bank's order
      const link = tr.querySelector("a.name");
      link.textContent = m.batmon_name;
      const s = tr.querySelector(".status");
      s.textContent = m.batmon_status;
      s.dataset.status = m.batmon_status;
      for (const metric of ["soc", "voltage", "current"]) Batmon.showMetric(tr.querySelector(`[data-metric="${metric}"]`), m, metric);
      tr.querySelector('[data-metric="capacity"]').textContent = text(m.capacity_ah, "Ah");
      tr.querySelector(".included").textContent = offline.has(id) ? "left out (Offline)" : "yes";
    }
    $("#no-members").hidden = bank.batmon_ids.length > 0;
    const names = bank.offline_batmon_ids.map((id) => (members.get(id) || { batmon_name: `batmon ${id}` }).batmon_name);
    $("#offline-names").textContent = names.join(", ");
    $("#offline").hidden = names.length === 0;
    renderAlarms(bank.alarms || []);
    $("#bank-values").dataset.updated = String(Date.now());
  }

  // -- the bank's alarms (on its SoC, voltage, current or power; docs/BANKS.md) ---------
  const alarmForm = $("#bank-alarm-form");
  const alarmStatus = alarmForm.querySelector(".form-status");

  function alarmButton(text, label, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "secondary small";
    b.textContent = text;
    b.setAttribute("aria-label", label);
    b.addEventListener("click", onClick);
    return b;
  }

  async function alarmAction(path, fields, done) {
    try {
      await Batmon.api(path, fields);
      bank = await Batmon.api("/interface/bank/status", { bank_id: bankId }, "GET");
      render();
      Batmon.say(alarmStatus, done);
    } catch (e) {
      Batmon.say(alarmStatus, e.message, "error");
    }
  }

  function renderAlarms(alarms) {
    const list = $("#bank-alarms");
    list.replaceChildren();
    $("#no-bank-alarms").hidden = alarms.length > 0;
    for (const a of alarms) {
      const li = document.createElement("li");
      li.dataset.alarmId = a.alarm_id;
      const unit = Batmon.DEFAULT_UNITS[a.alarm_metric] || "";
      const name = document.createElement("strong");
      name.textContent = a.alarm_name;
      const rule = document.createElement("span");
      rule.textContent = `${a.alarm_metric} ${a.alarm_condition} ${Batmon.withUnit(a.alarm_threshold_value, unit)}` +
        (a.alarm_clear_value == null ? "" : `, clears past ${Batmon.withUnit(a.alarm_clear_value, unit)}`);
      const state = document.createElement("span");
      state.className = "alarm-state";
      state.dataset.state = !a.alarm_enabled ? "disabled" : a.alarm_triggered ? (a.alarm_akn === null ? "triggered" : "acknowledged") : "ok";
      state.textContent = Batmon.alarmState(a);
      li.append(name, " ", rule, " ", state);
      if (a.alarm_triggered && a.alarm_akn === null) {
        li.append(" ", alarmButton("Acknowledge", `Acknowledge alarm ${a.alarm_name}`, () => alarmAction(
          "/interface/batmon/alarm/ack", { alarm_id: a.alarm_id }, `Alarm ${a.alarm_name} acknowledged.`)));
      }
      li.append(" ", alarmButton("Delete", `Delete alarm ${a.alarm_name}`, () => {
        if (window.confirm(`Delete alarm ${a.alarm_name}?`)) {
          alarmAction("/interface/batmon/alarm/delete", { alarm_id: a.alarm_id }, `Alarm ${a.alarm_name} deleted.`);
        }
      }));
      list.append(li);
    }
  }

  alarmForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const fields = Batmon.formFields(alarmForm);
    if (!fields.alarm_name || fields.alarm_threshold_value === undefined) {
      Batmon.say(alarmStatus, "An alarm needs a name and a threshold.", "error");
      return;
    }
    await alarmAction("/interface/batmon/alarm/add", { ...fields, bank_id: bankId }, `Alarm ${fields.alarm_name} added.`);
    if (alarmStatus.dataset.kind !== "error") alarmForm.reset();
  });

  function newRow(id) {
    const tr = document.createElement("tr");
    tr.dataset.batmonId = id;
    const th = document.createElement("th");
    th.scope = "row";
    th.dataset.label = "Name";
    const a = document.createElement("a");
    a.className = "name";
    a.href = `/batmon/${id}`;
    th.append(a);
    tr.append(th);
    const cells = [["Status", null], ["SoC", "soc"], ["Capacity", "capacity"], ["Voltage", "voltage"],
      ["Current", "current"], ["In the bank's values", null]];
    for (const [label, metric] of cells) {
      const td = document.createElement("td");
      td.dataset.label = label;
      if (metric) {
        td.className = "num";
        td.dataset.metric = metric;
      } else if (label === "Status") {
        const span = document.createElement("span");
        span.className = "status";
        td.append(span);
      } else {
        td.className = "included";
      }
      tr.append(td);
    }
    return tr;
  }

  // A burst of member readings asks once: the last change wins within 200 ms.
  let pending = null;
  function refreshSoon() {
    if (pending !== null) return;
    pending = window.setTimeout(async () => {
      pending = null;
      try {
        bank = await Batmon.api("/interface/bank/status", { bank_id: bankId }, "GET");
        render();
      } catch (e) {
        if (e.status === 404) window.location.assign("/");
      }
    }, 200);
  }

  function memberChanged(b) {
    if (!bank.batmon_ids.includes(b.batmon_id)) return;
    members.set(b.batmon_id, b);
    refreshSoon();
  }

  Batmon.live({
    snapshot: (all) => {
      for (const b of all) members.set(b.batmon_id, b);
      refreshSoon();
    },
    batmon: memberChanged,
    deleted: (d) => {
      if (bank.batmon_ids.includes(d.batmon_id)) refreshSoon();
    },
    // The bank itself, as the server sends it when its values, members or alarms change.
    bank: (k) => {
      if (k.bank_id !== bankId) return;
      bank = k;
      render();
    },
    bank_deleted: (d) => {
      if (d.bank_id === bankId) window.location.assign("/");
    },
  });

  const form = $("#bank-form");
  const status = form.querySelector(".form-status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = form.elements.bank_name.value.trim();
    const ids = [...form.querySelectorAll('input[name="batmon_ids"]:checked')].map((el) => Number(el.value));
    if (!name || !ids.length) {
      Batmon.say(status, "A bank needs a name and at least one batmon.", "error");
      return;
    }
    try {
      await Batmon.api("/interface/edit/bank", { bank_id: bankId, bank_name: name, batmon_ids: ids });
      bank = await Batmon.api("/interface/bank/status", { bank_id: bankId }, "GET");
      document.title = `${bank.bank_name} · batmon bridge`;
      render();
      Batmon.say(status, "Bank saved.");
    } catch (e) {
      Batmon.say(status, e.message, "error");
    }
  });

  $("#delete-bank").addEventListener("click", async () => {
    try {
      await Batmon.api("/interface/delete/bank", { bank_id: bankId });
      window.location.assign("/");
    } catch (e) {
      Batmon.say($("#delete-status"), e.message, "error");
    }
  });
})();
