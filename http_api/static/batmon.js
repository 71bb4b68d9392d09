// One batmon's page: uPlot charts of the downsampled history, alarms, settings, log.
"use strict";
(() => {
  const METRICS = ["voltage", "current", "power", "soc"];
  const DEFAULT_UNITS = { voltage: "V", current: "A", power: "W", soc: "%" };
  // The battery values' units (bridge/battery_values.py VALUE_UNITS), for alarms on them.
  const VALUE_UNITS = { temperature: "°C", time_to_go: "min", consumed_ah: "Ah", cell_min: "V", cell_max: "V",
                        cell_delta: "V" };
  let batmon = Batmon.initialJson("initial-batmon");
  const id = batmon.batmon_id;
  const $ = (selector) => document.querySelector(selector);

  // -- header: status, values, age ------------------------------------------------
  function renderHead(b) {
    $("#batmon-name").textContent = b.batmon_name;
    $("#batmon-type").textContent = b.batmon_type;
    document.title = `${b.batmon_name} · batmon bridge`;
    const status = $("#batmon-status");
    status.textContent = b.batmon_status;
    status.dataset.status = b.batmon_status;
    const age = $("#batmon-age");
    age.dataset.epoch = b.last_reading === null ? "" : String(b.last_reading);
    age.textContent = Batmon.age(b.last_reading);
    for (const m of METRICS) {
      Batmon.showMetric($(`#now-values [data-metric="${m}"]`), b, m);
      $(`.chart[data-metric="${m}"] .unit`).textContent = `(${b.units[m]})`;
    }
    renderBattery(b);
  }

  // -- battery values: shown once the batmon has them (docs/BATTERY.md) ---------------
  function showValue(name, text) {
    const item = $(`#battery-values [data-value="${name}"]`);
    item.hidden = text === null;
    if (text !== null) item.querySelector("dd").textContent = text;
  }

  function renderBattery(b) {
    const kwh = (v) => Batmon.withUnit(v, "kWh");
    showValue("energy-total", `${kwh(b.energy_charged_kwh)} in · ${kwh(b.energy_discharged_kwh)} out`);
    showValue("temperature", b.temperature == null ? null : Batmon.withUnit(b.temperature, "°C"));
    showValue("time_to_go", b.time_to_go == null ? null : timeToGo(b.time_to_go));
    showValue("cells", b.cell_min == null ? null :
      `min ${Batmon.withUnit(b.cell_min, "V")} (cell ${b.cell_min_index}) · ` +
      `max ${Batmon.withUnit(b.cell_max, "V")} (cell ${b.cell_max_index}) · ` +
      `delta ${Batmon.withUnit(b.cell_delta, "V")}`);
  }

  function timeToGo(minutes) {
    const m = Math.round(minutes);
    return m < 60 ? `${m} min` : `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  /** Today's kWh in and out: the history's energy sums since local midnight. */
  async function loadToday() {
    const midnight = new Date();
    midnight.setHours(0, 0, 0, 0);
    const min = Math.floor(midnight.getTime() / 1000);
    const max = Math.floor(Batmon.serverTime());
    try {
      const [h] = await Batmon.api("/interface/batmon/history",
        { batmon_id: id, min_epoch_tm_sec: min, max_epoch_tm_sec: max, bucket: Math.max(1, max - min + 1) }, "GET");
      const sum = (key) => h.data.reduce((total, r) => total + (r[key] || 0), 0);
      const dd = $("#energy-today");
      dd.dataset.charged = String(sum("energy_charged_kwh"));
      dd.dataset.discharged = String(sum("energy_discharged_kwh"));
      dd.textContent = `${Batmon.withUnit(round3(sum("energy_charged_kwh")), "kWh")} in · ` +
        `${Batmon.withUnit(round3(sum("energy_discharged_kwh")), "kWh")} out`;
    } catch (e) {
      $("#energy-today").textContent = "unknown";
    }
  }
  const round3 = (v) => Math.round(v * 1000) / 1000;

  // -- energy per day: bars of kWh in and out -------------------------------------------
  let energyPlot = null;
  async function loadEnergyDays() {
    const figure = $("#energy-chart");
    const day = 86400;
    const max = Math.floor(Batmon.serverTime());
    const min = Math.floor(max / day) * day - 29 * day;
    figure.dataset.state = "loading";
    try {
      const [h] = await Batmon.api("/interface/batmon/history",
        { batmon_id: id, min_epoch_tm_sec: min, max_epoch_tm_sec: max, bucket: day }, "GET");
      const rows = h.data;
      const data = [rows.map((r) => r.time), rows.map((r) => round3(r.energy_charged_kwh)),
                    rows.map((r) => round3(-r.energy_discharged_kwh))];
      const c = colors();
      const bars = uPlot.paths.bars({ size: [0.4, 40] });
      const opts = {
        width: Math.max(240, Math.floor(figure.clientWidth - 8)),
        height: 200,
        scales: { x: { time: true, range: () => [min - day / 2, max + day / 2] } },
        series: [
          {},
          { label: "in", stroke: c.line, fill: c.line, paths: bars, points: { show: false },
            value: (u, v) => Batmon.withUnit(v, "kWh") },
          { label: "out", stroke: c.faint, fill: c.faint, paths: bars, points: { show: false },
            value: (u, v) => Batmon.withUnit(v == null ? v : -v, "kWh") },
        ],
        axes: [
          { stroke: c.fg, grid: { stroke: c.grid }, ticks: { stroke: c.grid } },
          { stroke: c.fg, grid: { stroke: c.grid }, ticks: { stroke: c.grid }, size: 56 },
        ],
      };
      if (energyPlot) energyPlot.destroy();
      const target = figure.querySelector(".plot");
      target.replaceChildren();
      energyPlot = new uPlot(opts, data, target);
      figure.dataset.points = String(energyPlot.data[0].length);
      figure.querySelector(".chart-summary").textContent = rows.length
        ? `${rows.length} days with readings.` : "No readings in the last 30 days.";
      figure.dataset.state = "ready";
    } catch (e) {
      figure.dataset.state = "error";
    }
  }
  // Live readings change today's sums: ask again at most every 30 s.
  let todayTimer = 0;
  function todayLater() {
    if (todayTimer) return;
    todayTimer = window.setTimeout(() => { todayTimer = 0; loadToday(); }, 30000);
  }

  /** The status API's batmon object in the live stream's shape. */
  function snapshotOf(b, previous) {
    const units = Object.fromEntries(METRICS.map((m) => [m, b[m + "_units"] || DEFAULT_UNITS[m]]));
    const token = b.batmon_token;
    delete b.batmon_token;
    // The status API has no report times: keep the stream's (the next event brings new ones).
    const { last_reading, reported, stale } = previous;
    return { ...b, units, last_reading, reported, stale, _token: token };
  }

  async function refresh() {
    const b = await Batmon.api("/interface/batmon/status", { batmon_id: id }, "GET");
    batmon = snapshotOf(b, batmon);
    renderHead(batmon);
    renderAlarms(batmon.alarms);
    return batmon;
  }

  // -- charts ------------------------------------------------------------------------
  const chartsEl = $("#charts");
  const chartStatus = $("#chart-status");
  const plots = {};
  let range = { seconds: 3600 };
  let shown = null; // {min, max, x: [], series: {metric: [avg, min, max]}}

  function colors() {
    const css = getComputedStyle(document.documentElement);
    const v = (name) => css.getPropertyValue(name).trim();
    return { fg: v("--fg"), grid: v("--grid"), line: v("--accent"), band: v("--band"), faint: v("--faint") };
  }

  function chartWidth() {
    return Math.max(240, Math.floor(chartsEl.querySelector(".chart").clientWidth - 8));
  }

  function makePlot(metric, data) {
    const c = colors();
    const unit = batmon.units[metric];
    const opts = {
      width: chartWidth(),
      height: 200,
      scales: {
        x: { time: true, range: (u, lo, hi) => [shown.min, Math.max(shown.max, hi || shown.max)] },
      },
      series: [
        {},
        { label: "avg", stroke: c.line, width: 2, spanGaps: true, value: (u, v) => Batmon.formatMetric(v, metric, unit) },
        { label: "min", stroke: c.faint, width: 1, spanGaps: true, value: (u, v) => Batmon.formatMetric(v, metric, unit) },
        { label: "max", stroke: c.faint, width: 1, spanGaps: true, value: (u, v) => Batmon.formatMetric(v, metric, unit) },
      ],
      bands: [{ series: [3, 2], fill: c.band }],
      axes: [
        { stroke: c.fg, grid: { stroke: c.grid }, ticks: { stroke: c.grid } },
        { stroke: c.fg, grid: { stroke: c.grid }, ticks: { stroke: c.grid }, size: 56 },
      ],
      legend: { live: true },
    };
    const target = chartsEl.querySelector(`.chart[data-metric="${metric}"] .plot`);
    target.replaceChildren();
    return new uPlot(opts, data, target);
  }

  function seriesOf(rows, metric) {
    const pick = (row, suffix) => {
      const v = row[`batmon_${metric}_${suffix}`];
      return v === undefined ? row[`batmon_${metric}`] ?? null : v;
    };
    return [rows.map((r) => pick(r, "avg")), rows.map((r) => pick(r, "min")), rows.map((r) => pick(r, "max"))];
  }

  function draw() {
    for (const m of METRICS) {
      const data = [shown.x, ...shown.series[m]];
      if (plots[m]) plots[m].destroy();
      plots[m] = makePlot(m, data);
      const figure = chartsEl.querySelector(`.chart[data-metric="${m}"]`);
      // What uPlot holds, not what we meant to give it: the browser test compares this with the API.
      figure.dataset.points = String(plots[m].data[0].length);
      const values = shown.series[m][0].filter((v) => v !== null);
      figure.querySelector(".chart-summary").textContent = values.length
        ? `${values.length} points, from ${Batmon.withUnit(Math.min(...values), batmon.units[m])} to ${Batmon.withUnit(Math.max(...values), batmon.units[m])}.`
        : "No readings in this range.";
    }
    chartsEl.dataset.points = String(shown.x.length);
  }

  /** Ask the history API for about one point per pixel of the chosen range. */
  async function load() {
    const now = Math.floor(Batmon.serverTime());
    const min = range.from ?? now - range.seconds;
    const max = range.to ?? now;
    const points = Math.min(1000, Math.max(60, chartWidth()));
    chartsEl.dataset.state = "loading";
    Batmon.say(chartStatus, "Loading…");
    try {
      const [h] = await Batmon.api("/interface/batmon/history",
        { batmon_id: id, min_epoch_tm_sec: min, max_epoch_tm_sec: max, points }, "GET");
      const rows = h.data;
      // Bucketed rows carry `time`; raw rows (a server without downsampling) only update_time.
      const x = rows.map((r) => r.time ?? Date.parse(r.update_time + "Z") / 1000);
      shown = { min, max, x, series: Object.fromEntries(METRICS.map((m) => [m, seriesOf(rows, m)])) };
      Object.assign(chartsEl.dataset, { min: String(min), max: String(max), requestedPoints: String(points),
                                        appended: "0" });
      draw();
      showCsvLink(min, max);
      chartsEl.dataset.state = "ready";
      Batmon.say(chartStatus, rows.length
        ? `${rows.length} points from ${Batmon.timeText(min)} to ${Batmon.timeText(max)}${h.bucket ? `, one per ${h.bucket} s` : ""}.`
        : `No readings from ${Batmon.timeText(min)} to ${Batmon.timeText(max)}.`);
    } catch (e) {
      chartsEl.dataset.state = "error";
      Batmon.say(chartStatus, e.message, "error");
    }
  }

  /** The CSV link asks for the raw readings of the range the charts show (not their buckets). */
  function showCsvLink(min, max) {
    const query = new URLSearchParams({ batmon_id: id, min_epoch_tm_sec: min, max_epoch_tm_sec: max, format: "csv" });
    const link = $("#csv-download");
    link.href = `/interface/batmon/history?${query}`;
    link.setAttribute("download", `batmon-${id}-${min}-${max}.csv`);
    link.dataset.min = String(min);
    link.dataset.max = String(max);
    $("#csv-range").textContent = `${Batmon.timeText(min)} to ${Batmon.timeText(max)}`;
  }

  /** A live reading extends a "last …" range by one point, without asking the server. */
  function appendLive(b) {
    if (!shown || range.to !== undefined || b.last_reading === null) return;
    const last = shown.x.length ? shown.x[shown.x.length - 1] : -Infinity;
    if (b.last_reading <= last) return;
    shown.x.push(b.last_reading);
    chartsEl.dataset.appended = String(Number(chartsEl.dataset.appended || 0) + 1);
    // A value the reading left out is a gap, not a repeat of the old one.
    const carried = (m) => !(Array.isArray(b.stale) && b.stale.includes(m));
    for (const m of METRICS) for (const s of shown.series[m]) s.push(carried(m) ? b["batmon_" + m] : null);
    for (const m of METRICS) {
      plots[m].setData([shown.x, ...shown.series[m]]);
      chartsEl.querySelector(`.chart[data-metric="${m}"]`).dataset.points = String(plots[m].data[0].length);
    }
    chartsEl.dataset.points = String(shown.x.length);
  }

  for (const button of document.querySelectorAll(".ranges button")) {
    button.addEventListener("click", () => {
      for (const other of document.querySelectorAll(".ranges button")) other.setAttribute("aria-pressed", String(other === button));
      range = { seconds: Number(button.dataset.range) };
      load();
    });
  }
  $("#custom-range").addEventListener("submit", (event) => {
    event.preventDefault();
    const from = Date.parse($("#range-from").value) / 1000;
    const to = Date.parse($("#range-to").value) / 1000;
    if (!Number.isFinite(from) || !Number.isFinite(to) || to <= from) {
      Batmon.say(chartStatus, "Give a From before the To.", "error");
      return;
    }
    for (const other of document.querySelectorAll(".ranges button")) other.setAttribute("aria-pressed", "false");
    range = { from: Math.floor(from), to: Math.ceil(to) };
    load();
  });
  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    window.clearTimeout(resizeTimer);
    resizeTimer = window.setTimeout(() => {
      for (const m of METRICS) if (plots[m]) plots[m].setSize({ width: chartWidth(), height: 200 });
    }, 150);
  });
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => shown && draw());

  // -- alarms ------------------------------------------------------------------------
  const alarmForm = $("#alarm-form");
  const alarmStatus = alarmForm.querySelector(".form-status");

  function button(text, label, onClick, disabled = false) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "secondary small";
    b.textContent = text;
    b.setAttribute("aria-label", label);
    b.disabled = disabled;
    b.addEventListener("click", onClick);
    return b;
  }

  async function alarmAction(path, fields, done) {
    try {
      await Batmon.api(path, fields);
      Batmon.say(alarmStatus, done);
      await refresh();
    } catch (e) {
      Batmon.say(alarmStatus, e.message, "error");
    }
  }

  function renderAlarms(alarms) {
    const tbody = $("#alarms-table tbody");
    tbody.replaceChildren();
    $("#no-alarms").hidden = alarms.length > 0;
    $("#alarms-table").hidden = alarms.length === 0;
    for (const a of alarms) {
      const tr = document.createElement("tr");
      tr.dataset.alarmId = a.alarm_id;
      tr.dataset.triggered = String(a.alarm_triggered);
      tr.dataset.acknowledged = String(a.alarm_akn !== null);
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = a.alarm_name;
      const rule = document.createElement("td");
      const unit = batmon.units[a.alarm_metric] ?? VALUE_UNITS[a.alarm_metric] ?? "";
      rule.textContent = `${a.alarm_metric} ${a.alarm_condition} ${Batmon.withUnit(a.alarm_threshold_value, unit)}` +
        (a.alarm_clear_value == null ? "" : `, clears past ${Batmon.withUnit(a.alarm_clear_value, unit)}`);
      const repeat = document.createElement("td");
      repeat.textContent = `${a.alarm_repeat_delay} s`;
      const enabled = document.createElement("td");
      const toggle = document.createElement("input");
      toggle.type = "checkbox";
      toggle.checked = a.alarm_enabled;
      toggle.setAttribute("aria-label", `Alarm ${a.alarm_name} enabled`);
      toggle.addEventListener("change", () => alarmAction("/interface/batmon/alarm/edit",
        { alarm_id: a.alarm_id, alarm_enabled: toggle.checked },
        `Alarm ${a.alarm_name} ${toggle.checked ? "enabled" : "disabled"}.`));
      enabled.append(toggle);
      const state = document.createElement("td");
      state.className = "alarm-state";
      state.dataset.state = !a.alarm_enabled ? "disabled" : a.alarm_triggered ? (a.alarm_akn === null ? "triggered" : "acknowledged") : "ok";
      state.textContent = Batmon.alarmState(a);
      const actions = document.createElement("td");
      actions.className = "row-actions";
      actions.append(
        button("Acknowledge", `Acknowledge alarm ${a.alarm_name}`, () => alarmAction("/interface/batmon/alarm/ack",
          { alarm_id: a.alarm_id }, `Alarm ${a.alarm_name} acknowledged.`), !a.alarm_triggered || a.alarm_akn !== null),
        button("Edit", `Edit alarm ${a.alarm_name}`, () => editAlarm(a)),
        button("Delete", `Delete alarm ${a.alarm_name}`, () => {
          if (window.confirm(`Delete alarm ${a.alarm_name}?`)) {
            alarmAction("/interface/batmon/alarm/delete", { alarm_id: a.alarm_id }, `Alarm ${a.alarm_name} deleted.`);
          }
        }),
      );
      name.dataset.label = "Name";
      rule.dataset.label = "Rule";
      repeat.dataset.label = "Repeat";
      enabled.dataset.label = "Enabled";
      state.dataset.label = "State";
      tr.append(name, rule, repeat, enabled, state, actions);
      tbody.append(tr);
    }
  }

  function editAlarm(a) {
    const f = alarmForm.elements;
    f.alarm_id.value = a.alarm_id;
    f.alarm_name.value = a.alarm_name;
    f.alarm_metric.value = a.alarm_metric;
    f.alarm_condition.value = a.alarm_condition;
    f.alarm_threshold_value.value = a.alarm_threshold_value;
    f.alarm_clear_value.value = a.alarm_clear_value ?? "";
    f.alarm_repeat_delay.value = a.alarm_repeat_delay;
    f.alarm_enabled.checked = a.alarm_enabled;
    $("#alarm-form-title").textContent = `Edit alarm ${a.alarm_name}`;
    $("#alarm-submit").textContent = "Save alarm";
    $("#alarm-cancel").hidden = false;
    f.alarm_name.focus();
  }

  function resetAlarmForm() {
    alarmForm.reset();
    alarmForm.elements.alarm_id.value = "";
    $("#alarm-form-title").textContent = "Add an alarm";
    $("#alarm-submit").textContent = "Add alarm";
    $("#alarm-cancel").hidden = true;
  }

  $("#alarm-cancel").addEventListener("click", resetAlarmForm);
  alarmForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const fields = Batmon.formFields(alarmForm);
    if (!fields.alarm_name) {
      Batmon.say(alarmStatus, "Give the alarm a name.", "error");
      alarmForm.elements.alarm_name.focus();
      return;
    }
    try {
      if (fields.alarm_id) {
        await Batmon.api("/interface/batmon/alarm/edit", fields);
        Batmon.say(alarmStatus, `Alarm ${fields.alarm_name} saved.`);
      } else {
        delete fields.alarm_id;
        const added = await Batmon.api("/interface/batmon/alarm/add", { ...fields, batmon_id: id });
        Batmon.say(alarmStatus, `Alarm ${fields.alarm_name} added (id ${added.alarm_id}).`);
      }
      resetAlarmForm();
      await refresh();
    } catch (e) {
      Batmon.say(alarmStatus, e.message, "error");
    }
  });

  // -- settings, flags, token, delete --------------------------------------------------
  const settings = $("#settings-form");
  settings.addEventListener("submit", async (event) => {
    event.preventDefault();
    const status = settings.querySelector(".form-status");
    const fields = Batmon.formFields(settings);
    // An emptied units field goes back to the default unit.
    for (const m of METRICS) fields[`${m}_units`] = settings.elements[`${m}_units`].value.trim();
    try {
      await Batmon.api("/interface/edit/batmon", { ...fields, batmon_id: id });
      Batmon.say(status, "Settings saved.");
      await refresh();
      if (shown) draw();
    } catch (e) {
      Batmon.say(status, e.message, "error");
    }
  });
  for (const box of document.querySelectorAll(".flags input[data-flag]")) {
    box.addEventListener("change", async () => {
      const action = box.checked ? "enable" : "disable";
      try {
        await Batmon.api(`/interface/batmon/${action}/${box.dataset.flag}`, { batmon_id: id });
        Batmon.say($("#flags-status"), `${box.labels[0].textContent}: ${box.checked ? "on" : "off"}.`);
      } catch (e) {
        box.checked = !box.checked;
        Batmon.say($("#flags-status"), e.message, "error");
      }
    });
  }
  // -- connect this device: where and how it sends readings ----------------------------
  // The MQTT address and base topic come from /healthz, the same answer `batmon simulate`
  // reads; a server listening on every address is reached at the host this page came from.
  const WILDCARDS = new Set(["", "0.0.0.0", "::", "[::]"]);
  const connect = { host: window.location.hostname, port: null, base: "batmon", token: null };
  const shell = (text) => (/^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replaceAll("'", "'\\''")}'`);

  function renderConnect() {
    const token = connect.token ?? "TOKEN";
    const host = connect.host.includes(":") ? `[${connect.host}]` : connect.host;
    const topic = `${connect.base}/${id}/${token}/update`;
    $("#mqtt-host").textContent = connect.host;
    $("#mqtt-port").textContent = connect.port === null ? "unknown" : String(connect.port);
    $("#mqtt-topic").textContent = topic;
    const reading = '{"voltage": 12.8, "current": -3.0, "power": -38, "soc": 86}';
    $("#pub-line").textContent = ["mosquitto_pub", "-V", "mqttv311", "-h", shell(connect.host),
      "-p", String(connect.port ?? 1883), "-u", String(id), "-P", shell(token), "-q", "1",
      "-t", shell(topic), "-m", shell(reading)].join(" ");
    const url = `${window.location.protocol}//${host}${window.location.port ? ":" + window.location.port : ""}`;
    $("#curl-line").textContent = `curl -s -X POST ${shell(url + "/interface/update/batmon")} -d batmon_id=${id}` +
      ` -d batmon_token=${shell(token)} -d batmon_voltage=12.8 -d batmon_current=-3.0 -d batmon_power=-38 -d batmon_soc=86`;
  }

  async function loadConnect() {
    try {
      const response = await fetch("/healthz", { headers: { Accept: "application/json" } });
      const health = await response.json();
      if (health.mqtt_port) connect.port = Number(health.mqtt_port);
      if (health.mqtt_base_topic) connect.base = health.mqtt_base_topic;
      if (health.mqtt_host && !WILDCARDS.has(health.mqtt_host)) connect.host = health.mqtt_host;
      if (health.broker === "external") {
        $("#connect-note").textContent = "This server uses an external MQTT broker: the device logs in"
          + " with that broker's own credentials and publishes to the topic below.";
      }
    } catch (e) {
      Batmon.say($("#copy-status"), "The MQTT address is unknown (/healthz did not answer).", "error");
    }
    renderConnect();
  }

  /** Fetch the device token (on demand only: it is never in the page or the stream). */
  async function revealToken() {
    const b = await refresh();
    connect.token = b._token;
    $("#token").textContent = b._token;
    $("#token").hidden = false;
    $("#show-token").textContent = "Hide device token";
    $("#show-token").setAttribute("aria-expanded", "true");
    renderConnect();
  }

  $("#show-token").addEventListener("click", async () => {
    if (connect.token === null) return revealToken();
    connect.token = null;
    $("#token").hidden = true;
    $("#token").textContent = "";
    $("#show-token").textContent = "Show device token";
    $("#show-token").setAttribute("aria-expanded", "false");
    renderConnect();
  });

  /** Copy a command line (with the real token: copying shows it first). The clipboard API
   * needs a secure context; over plain http on a LAN the text is selected for Ctrl+C instead. */
  for (const copy of document.querySelectorAll("[data-copy]")) {
    copy.addEventListener("click", async () => {
      const status = $("#copy-status");
      try {
        if (connect.token === null) await revealToken();
        const code = document.getElementById(copy.dataset.copy);
        if (navigator.clipboard && window.isSecureContext) {
          await navigator.clipboard.writeText(code.textContent);
          Batmon.say(status, `Copied the ${code.dataset.command} line.`);
        } else {
          window.getSelection().selectAllChildren(code);
          Batmon.say(status, `Selected the ${code.dataset.command} line: press Ctrl+C (⌘C) to copy it.`);
        }
      } catch (e) {
        Batmon.say(status, e.message, "error");
      }
    });
  }
  $("#delete-batmon").addEventListener("click", async () => {
    if (!window.confirm(`Delete ${batmon.batmon_name} with its history and alarms?`)) return;
    try {
      await Batmon.api("/interface/delete/batmon", { batmon_id: id });
      window.location.assign("/");
    } catch (e) {
      Batmon.say($("#delete-status"), e.message, "error");
    }
  });

  // -- notification log ------------------------------------------------------------------
  async function loadLog() {
    const notices = await Batmon.api("/interface/batmon/notifications", { batmon_id: id }, "GET");
    const tbody = $("#log-table tbody");
    tbody.replaceChildren();
    $("#no-log").hidden = notices.length > 0;
    for (const n of notices) {
      const tr = document.createElement("tr");
      const state = n.state + (n.last_error ? `: ${n.last_error}` : "") + (n.target ? ` (${n.target})` : "");
      const cells = { Created: Batmon.timeText(n.created), Channel: n.channel, Notice: n.title, State: state };
      for (const [label, text] of Object.entries(cells)) {
        const td = document.createElement("td");
        td.dataset.label = label;
        td.textContent = text;
        tr.append(td);
      }
      tbody.append(tr);
    }
  }
  $("#refresh-log").addEventListener("click", loadLog);

  // -- live ------------------------------------------------------------------------------
  let logTimer = 0;
  let snapshots = 0;
  const gone = () => window.location.assign("/");
  function changed(b) {
    const alarmsBefore = JSON.stringify(batmon.alarms.map((a) => [a.alarm_triggered, a.alarm_trigger_time]));
    batmon = b;
    renderHead(b);
    renderAlarms(b.alarms);
    appendLive(b);
    todayLater();
    // An alarm that changed state has probably queued a notice: show it shortly.
    if (JSON.stringify(b.alarms.map((a) => [a.alarm_triggered, a.alarm_trigger_time])) !== alarmsBefore) {
      window.clearTimeout(logTimer);
      logTimer = window.setTimeout(loadLog, 1000);
    }
  }
  Batmon.live({
    snapshot: (batmons) => {
      const b = batmons.find((x) => x.batmon_id === id);
      if (!b) return gone();
      changed(b);
      // A later snapshot follows a reconnect: readings may have been missed, redraw.
      if (++snapshots > 1) load();
    },
    batmon: (b) => b.batmon_id === id && changed(b),
    deleted: (d) => d.batmon_id === id && gone(),
  });

  renderHead(batmon);
  renderAlarms(batmon.alarms);
  Batmon.tickAges();
  renderConnect();
  loadConnect();
  load();
  loadToday();
  loadEnergyDays();
  loadLog();
})();
