// The widgets' HTML manager (shipped in _static/@jupyter-widgets/, see data_download/book_assets.py)
// finds its fonts next to the URL RequireJS gives its module name; without this mapping that is
// "<page folder>/@jupyter-widgets/…", which does not exist.
require.config({
  paths: { "@jupyter-widgets": document.documentElement.dataset.content_root + "_static/@jupyter-widgets" },
});

// ipywidgets 8's controls typeset their labels with MathJax 2's `MathJax.Hub.Queue`; this book loads
// MathJax 3, which has no `Hub`, so every widget logged "Cannot read properties of undefined (reading
// 'Queue')". Give MathJax 3 that one call. This listener is registered before the widget manager's, so
// it runs first; by `load` MathJax 3 has replaced `window.MathJax` with its own object.
(function () {
  function shim() {
    var mj = window.MathJax;
    if (mj && !mj.Hub) {
      mj.Hub = {
        Queue: function (job) {
          var element = job && job[2];
          if (window.MathJax.typesetPromise) {
            window.MathJax.typesetPromise(element ? [element] : undefined).catch(function () {});
          }
        },
      };
    }
  }
  if (document.readyState === "complete") shim();
  else window.addEventListener("load", shim);
})();
