// Account: notification targets (shown masked by the API) and a test notice.
"use strict";
(() => {
  const form = document.getElementById("targets-form");
  const status = form.querySelector(".form-status");

  function show(targets) {
    for (const [name, masked] of Object.entries(targets)) {
      document.getElementById(`${name}-current`).textContent = masked || "not set";
      form.querySelector(`.remove[data-field="${name}"]`).hidden = !masked;
      form.elements[name].value = "";
    }
  }

  async function save(fields, done) {
    try {
      show(await Batmon.api("/interface/user/notifications", fields));
      Batmon.say(status, done);
    } catch (e) {
      Batmon.say(status, e.message, "error");
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const fields = Batmon.formFields(form);
    if (!Object.keys(fields).length) {
      Batmon.say(status, "Nothing to save: type a new target URL first.", "error");
      return;
    }
    save(fields, "Targets saved.");
  });
  for (const button of form.querySelectorAll(".remove")) {
    button.addEventListener("click", () => save({ [button.dataset.field]: "" }, "Target removed."));
  }

  const testStatus = document.getElementById("test-status");
  document.getElementById("test-notice").addEventListener("click", async () => {
    Batmon.say(testStatus, "Sending…");
    try {
      const result = await Batmon.api("/interface/user/notifications/test");
      Batmon.say(testStatus, `Test notice queued for: ${result.channels.join(", ")}.`);
    } catch (e) {
      Batmon.say(testStatus, e.message, "error");
    }
  });
})();
