(function () {
  "use strict";
  var config = JSON.parse(document.getElementById("config").textContent);
  function toggle(id, layer) {
    var box = document.getElementById(id), g = document.getElementById(layer);
    if (!box || !g) return;
    box.addEventListener("change", function () { g.classList.toggle("hidden", !box.checked); });
  }
  toggle("toggle-boxes", "layer-boxes");
  toggle("toggle-masks", "layer-masks");
  toggle("toggle-crops", "layer-crops");
  var claims = document.querySelectorAll("button.claim");
  claims.forEach(function (btn) {
    btn.addEventListener("click", function () {
      var ids = btn.getAttribute("data-evidence").split(" ").filter(Boolean);
      document.querySelectorAll(".hl").forEach(function (el) { el.classList.remove("hl"); });
      claims.forEach(function (b) {
        b.classList.remove("selected");
        b.setAttribute("aria-pressed", "false");
      });
      btn.classList.add("selected");
      btn.setAttribute("aria-pressed", "true");
      document.querySelectorAll("[data-evidence]").forEach(function (el) {
        if (el.tagName === "BUTTON") return;
        if (ids.indexOf(el.getAttribute("data-evidence")) >= 0) el.classList.add("hl");
      });
      var first = document.querySelector("rect.hl");
      if (first) document.getElementById("viewer").scrollIntoView({block: "nearest"});
    });
  });
  var form = document.getElementById("review-form");
  if (form && config.reviewUrl) {
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var data = new FormData(form), status = document.getElementById("review-status");
      var body = {verdict: data.get("verdict"), comment: data.get("comment") || ""};
      if (data.get("reviewer")) body.reviewer = data.get("reviewer");
      var headers = {"Content-Type": "application/json"};
      var token = new URLSearchParams(location.search).get("access_token");
      if (token) headers["Authorization"] = "Bearer " + token;
      status.textContent = "saving…";
      fetch(config.reviewUrl, {method: "POST", headers: headers, body: JSON.stringify(body)})
        .then(function (r) {
          if (!r.ok) return r.text().then(function (t) { throw new Error(r.status + " " + t); });
          return r.json();
        })
        .then(function (saved) {
          var list = document.getElementById("reviews"), none = list.querySelector(".none");
          if (none) none.remove();
          var li = document.createElement("li");
          li.className = "review verdict-" + saved.verdict;
          var b = document.createElement("b"); b.textContent = saved.verdict;
          li.appendChild(b);
          li.appendChild(document.createTextNode(" — " + saved.comment + " "));
          list.appendChild(li);
          status.textContent = "saved";
          form.reset();
        })
        .catch(function (err) { status.textContent = "not saved: " + err.message; });
    });
  }
})();
