// /docs: Swagger UI (vendored) over this server's /openapi.json; "Try it out" sends
// the browser's session cookie, so a logged-in user can call the API from here.
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    deepLinking: true,
    withCredentials: true,
    validatorUrl: null, // never ask swagger.io to validate (and no internet is needed)
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
