// The book's page script (book/_ext/presentation.py adds it to every page).
//
// Search result snippets are cut from a page's HTML text before MathJax has run, so inline math
// appears as raw TeX ("\(\frac{1}{\sqrt{d}}\)"). Turn each formula into readable plain text first.
(() => {
  const symbols = {
    sqrt: "√", times: "×", cdot: "·", sum: "Σ", prod: "Π", log: "log", exp: "exp",
    infty: "∞", le: "≤", leq: "≤", ge: "≥", geq: "≥", ne: "≠", neq: "≠", approx: "≈",
    in: "∈", to: "→", rightarrow: "→", partial: "∂", nabla: "∇", top: "ᵀ", mid: "|",
    alpha: "α", beta: "β", gamma: "γ", delta: "δ", epsilon: "ε", eta: "η", theta: "θ",
    lambda: "λ", mu: "μ", pi: "π", sigma: "σ", tau: "τ", phi: "φ", Delta: "Δ", Sigma: "Σ",
  };
  const plain = (tex) =>
    tex
      .replace(/^\\[(\[]|\\[)\]]$/g, "")
      .replace(/\\frac\{([^{}]*)\}\{([^{}]*)\}/g, "($1)/($2)")
      .replace(/\\(?:mathrm|mathbf|operatorname|text|mathbb|mathcal)\{([^{}]*)\}/g, "$1")
      .replace(/\\([A-Za-z]+)/g, (m, name) => symbols[name] ?? name)
      .replace(/\\[,;:! ]/g, " ")
      .replace(/[{}]/g, "")
      .replace(/\s+/g, " ")
      .trim();

  const patch = () => {
    if (typeof Search === "undefined" || Search._bookPatched) return;
    const original = Search.htmlToText;
    Search.htmlToText = (htmlString, anchor) => {
      const doc = new DOMParser().parseFromString(htmlString, "text/html");
      doc.querySelectorAll(".math").forEach((el) => {
        el.textContent = plain(el.textContent);
      });
      return original(doc.documentElement.outerHTML, anchor);
    };
    Search._bookPatched = true;
  };
  patch();
  document.addEventListener("DOMContentLoaded", patch);
})();
