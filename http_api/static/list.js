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

  function render(b) {
    const tr = tbody.querySelector(`tr[data-batmon-id="${b.batmon_id}"]`) || newRow(b);
    tr.querySelector("a.name").textContent = b.batmon_name;
    tr.querySelector(".type").textContent = b.batmon_type;
    const status = tr.querySelector(".status");
    status.textContent = b.batmon_status;
    status.dataset.status = b.batmon_status;
    for (const m of METRICS) {
      tr.querySelector(`[data-metric="${m}"]`).textContent = Batmon.withUnit(b["batmon_" + m], b.units[m]);
    }
    const ageCell = tr.querySelector(".age");
    ageCell.dataset.epoch = b.last_reading === null ? "" : String(b.last_reading);
    ageCell.textContent = Batmon.age(b.last_reading);
    const alarms = tr.querySelector(".alarms");
    alarms.replaceChildren();
    const active = b.alarms.filter((a) => a.alarm_triggered);
    if (!active.length) {
      const none = document.createElement("span");
      none.className = "muted";
      none.textContent = "none";
      alarms.append(none);
    }
    for (const a of active) {
      const chip = document.createElement("span");
      chip.className = "alarm-chip";
      chip.dataset.acknowledged = a.alarm_akn === null ? "no" : "yes";
      chip.textContent = a.alarm_name + (a.alarm_akn === null ? "" : " (acknowledged)");
      alarms.append(chip);
    }
    tr.dataset.updated = String(Date.now());
    empty.hidden = true;
  }

  function remove(batmonId) {
    const tr = tbody.querySelector(`tr[data-batmon-id="${batmonId}"]`);
    if (tr) tr.remove();
    empty.hidden = tbody.rows.length > 0;
  }

  /** The whole list as the server has it now: update every row, drop the gone ones. */
  function snapshot(batmons) {
    const seen = new Set(batmons.map((b) => String(b.batmon_id)));
    for (const tr of [...tbody.rows]) if (!seen.has(tr.dataset.batmonId)) remove(tr.dataset.batmonId);
    for (const b of batmons) render(b);
  }

  for (const b of Batmon.initialJson("initial-batmons") || []) render(b);
  Batmon.tickAges();
  Batmon.live({ snapshot, batmon: render, deleted: (d) => remove(d.batmon_id) });

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
