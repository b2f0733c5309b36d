// Prepare a book page for the ipywidgets embed manager (loaded right after this file).
//
// 1. RequireJS paths. embed-amd.js defines the AMD module
//    "@jupyter-widgets/html-manager/dist/libembed-amd" and loads its icon fonts from the
//    folder of that module's URL. Without a mapping, RequireJS resolves the module next to
//    the page (e.g. notebooks/@jupyter-widgets/...), where no font exists. This file sits in
//    the folder of embed-amd.js and its fonts, so that folder is this script's own folder:
//    it works at any page depth, over http:// and file://.
//
// 2. MathJax. The embed manager typesets widget labels with MathJax 2's API
//    (MathJax.Hub.Queue) whenever window.MathJax exists; the book loads MathJax 3, which has
//    no Hub, so a page with both math and widgets threw a TypeError. The shim below maps
//    that one call onto MathJax 3's typesetPromise. Widgets render on window "load", after
//    DOMContentLoaded, so the shim is in place before the first label is typeset.
(function () {
  var here = document.currentScript.src;
  var folder = here.slice(0, here.lastIndexOf("/"));
  window.requirejs.config({
    paths: { "@jupyter-widgets/html-manager/dist": folder },
  });

  function installMathJax2Shim() {
    var mathjax = window.MathJax;
    if (!mathjax || mathjax.Hub || !mathjax.startup) {
      return; // no MathJax on this page, a real MathJax 2, or MathJax 3 not loaded
    }
    mathjax.Hub = {
      Queue: function (command) {
        var element = command && command[2];
        if (element) {
          mathjax.startup.promise.then(function () {
            return mathjax.typesetPromise([element]);
          });
        }
      },
    };
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", installMathJax2Shim);
  } else {
    installMathJax2Shim();
  }
})();
