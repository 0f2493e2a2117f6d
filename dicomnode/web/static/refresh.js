// Refreshes the page's <main> in place every few seconds (no external libraries).
(function () {
  "use strict";
  var marker = document.getElementById("updated");
  var seconds = marker ? Number(marker.dataset.refreshS) || 5 : 5;
  function busy() {
    var active = document.activeElement;
    return active && (active.tagName === "INPUT" || active.tagName === "BUTTON" || active.tagName === "SELECT");
  }
  function refresh() {
    if (document.hidden || busy()) { return; }
    fetch(window.location.href, {
      credentials: "same-origin", cache: "no-store", headers: { "X-Refresh": "1" }
    })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (text) {
        if (text === null) { return; }
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("live");
        var live = document.getElementById("live");
        if (fresh && live) {
          live.innerHTML = fresh.innerHTML;
          if (marker) { marker.textContent = "updated " + new Date().toLocaleTimeString(); }
        }
      })
      .catch(function () { if (marker) { marker.textContent = "node not reachable"; } });
  }
  window.setInterval(refresh, seconds * 1000);
}());
