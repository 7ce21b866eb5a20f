// The Confide console's only script: upload progress for a form marked data-progress. It posts the
// same form (CSRF field included) with XMLHttpRequest to show how much has been sent, then shows the
// page the console answered. Without JavaScript the form posts as a plain form; the console checks
// the file either way. Shipped in the package, loaded from the console's own origin only.
"use strict";
(function () {
  function say(node, text) {
    if (node) node.textContent = text;
  }

  function size(bytes) {
    if (bytes < 1024) return bytes + " bytes";
    if (bytes < 1048576) return (bytes / 1024).toFixed(1) + " KiB";
    return (bytes / 1048576).toFixed(1) + " MiB";
  }

  function show(bar) {
    var row = document.getElementById(bar.id + "-row");
    if (row) row.hidden = false;
  }

  function attach(root) {
    var forms = root.querySelectorAll("form[data-progress]");
    Array.prototype.forEach.call(forms, function (form) {
      var bar = document.getElementById(form.getAttribute("data-progress"));
      var status = document.getElementById(form.getAttribute("data-progress") + "-status");
      form.addEventListener("submit", function (event) {
        var limit = Number(form.getAttribute("data-max-bytes")) || 0;
        var input = form.querySelector("input[type=file]");
        var file = input && input.files && input.files[0];
        if (file && limit && file.size > limit) {
          event.preventDefault();
          say(status, "This file is " + size(file.size) + ", over the console's " + size(limit) +
            " limit: nothing was sent (use `confide dataset upload` for larger files).");
          return;
        }
        if (!window.FormData || !window.XMLHttpRequest || !bar) return; // the plain form post
        event.preventDefault();
        var submit = form.querySelector("button[type=submit]");
        var xhr = new XMLHttpRequest();
        xhr.open("POST", form.action);
        xhr.responseType = "document";
        xhr.upload.addEventListener("progress", function (e) {
          if (!e.lengthComputable) return;
          bar.max = e.total;
          bar.value = e.loaded;
          say(status, "Sent " + Math.floor((100 * e.loaded) / e.total) + "% (" + size(e.loaded) + " of " +
            size(e.total) + ")");
        });
        xhr.addEventListener("load", function () {
          var page = xhr.response;
          if (!page || !page.documentElement) {
            say(status, "The console answered " + xhr.status + " without a page.");
            return;
          }
          var sent = bar.max;
          document.replaceChild(document.importNode(page.documentElement, true), document.documentElement);
          attach(document);
          var again = document.getElementById(form.getAttribute("data-progress"));
          if (again && xhr.status === 200) {
            show(again);
            again.max = sent;
            again.value = sent;
            say(document.getElementById(again.id + "-status"), "Last upload: all " + size(sent) + " sent.");
          }
        });
        xhr.addEventListener("error", function () {
          say(status, "The upload failed: the console could not be reached.");
          if (submit) submit.disabled = false;
        });
        if (submit) submit.disabled = true;
        show(bar);
        bar.value = 0;
        say(status, "Sending...");
        xhr.send(new FormData(form));
      });
    });
  }

  attach(document);
})();
