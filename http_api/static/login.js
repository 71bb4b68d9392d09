// Log in: the API checks the api_key and answers with the signed session cookie.
"use strict";
(() => {
  const form = document.getElementById("login-form");
  const status = form.querySelector(".form-status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = form.elements.api_key.value.trim();
    if (!key) {
      Batmon.say(status, "Give your api_key.", "error");
      form.elements.api_key.focus();
      return;
    }
    Batmon.say(status, "Logging in…");
    try {
      await Batmon.api("/interface/login", { api_key: key });
      window.location.assign("/");
    } catch (e) {
      Batmon.say(status, e.message, "error");
      form.elements.api_key.select();
    }
  });
})();
