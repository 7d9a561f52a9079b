"use strict";
const failed = new URLSearchParams(location.search).get("failed");
if (failed) {
  document.getElementById(failed === "role" ? "failed-role" : "failed").hidden = false;
}
