() => {
  // Flywheel chat, browser side: theme, sidebar on wide screens, copy, keyboard shortcuts. Runs once on load.
  // Nothing here renders message text: answers arrive as sanitized HTML from app/ui/render.py.
  const q = (s) => document.querySelector(s);
  const visible = (el) => !!el && el.offsetParent !== null;
  const press = (s) => { const el = q(s); if (visible(el) && !el.disabled) { el.click(); return true; } return false; };

  // Light / dark: the person's last choice, else the system's (Gradio's default).
  const applyTheme = (t) => document.body.classList.toggle('dark', t === 'dark');
  const saved = localStorage.getItem('fw-theme');
  if (saved === 'dark' || saved === 'light') applyTheme(saved);
  const toggleTheme = () => {
    const t = document.body.classList.contains('dark') ? 'light' : 'dark';
    localStorage.setItem('fw-theme', t);
    applyTheme(t);
  };

  // The sidebar starts closed (phones see the chat and its input first); wide screens open it.
  const sidebarToggle = () => q('.sidebar .toggle-button') || q('.toggle-button');
  const sidebarOpen = () => !!q('.sidebar.open');
  const openWide = (tries) => {
    const b = sidebarToggle();
    if (!b) { if (tries > 0) setTimeout(() => openWide(tries - 1), 100); return; }
    if (window.innerWidth >= 900 && !sidebarOpen()) b.click();
  };
  openWide(50);

  // Copy: the text a person sees (not the HTML behind it).
  const copyText = async (text) => {
    try { await navigator.clipboard.writeText(text); }
    catch (e) {
      const t = document.createElement('textarea'); t.value = text; document.body.appendChild(t);
      t.select(); document.execCommand('copy'); t.remove();
    }
  };
  const answerText = (bubble) => {
    const md = bubble.querySelector('.fw-md');
    return (md ? md.innerText : bubble.innerText).trim();
  };
  const lastAnswer = () => {
    const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
    return bots.length ? bots[bots.length - 1] : null;
  };
  // Gradio's own copy button would copy the HTML behind a bubble: take the click first and copy what is shown.
  document.addEventListener('click', (ev) => {
    const btn = ev.target.closest && ev.target.closest('#chatbot button[aria-label="Copy message"]');
    if (!btn) return;
    const buttons = btn.closest('.message-buttons');
    const row = buttons && buttons.previousElementSibling;
    const bubble = row && row.querySelector('[data-testid="bot"], [data-testid="user"]');
    if (!bubble) return;
    ev.stopPropagation();
    ev.preventDefault();
    const text = bubble.getAttribute('data-testid') === 'bot' ? answerText(bubble) : bubble.innerText.trim();
    copyText(text).then(() => {
      btn.classList.add('fw-copied');
      setTimeout(() => btn.classList.remove('fw-copied'), 1500);
    });
  }, true);

  // Editing a message starts from its bubble, which is the text HTML-escaped: show the person their own text.
  const unescapeHtml = (s) => { const t = document.createElement('textarea'); t.innerHTML = s; return t.value; };
  new MutationObserver(() => {
    document.querySelectorAll('#chatbot textarea:not([data-fw-unescaped])').forEach((box) => {
      box.dataset.fwUnescaped = '1';
      const raw = unescapeHtml(box.value);
      if (raw !== box.value) { box.value = raw; box.dispatchEvent(new Event('input', { bubbles: true })); }
    });
  }).observe(document.body, { childList: true, subtree: true });

  // On a narrow screen the sidebar covers the chat: picking a chat (or a new one) closes it.
  document.addEventListener('click', (ev) => {
    if (window.innerWidth >= 900 || !ev.target.closest || !sidebarOpen()) return;
    if (ev.target.closest('#new-chat') || ev.target.closest('#history label')) {
      setTimeout(() => { const b = sidebarToggle(); if (b && sidebarOpen()) b.click(); }, 150);
    }
  });

  document.addEventListener('click', (ev) => {
    if (ev.target.closest && ev.target.closest('#theme-toggle')) toggleTheme();
  });

  document.addEventListener('keydown', (ev) => {
    const mod = ev.ctrlKey || ev.metaKey;
    const inField = ['INPUT', 'TEXTAREA'].includes(document.activeElement && document.activeElement.tagName);
    const key = ev.key.toLowerCase();
    if (ev.key === 'Escape' && !ev.shiftKey) {
      if (press('#stop')) ev.preventDefault();
    } else if ((ev.key === 'Escape' && ev.shiftKey) || (ev.key === '/' && !inField && !mod)) {
      const box = q('#msg textarea'); if (box) { box.focus(); ev.preventDefault(); }
    } else if (mod && ev.shiftKey && key === 'o') {
      ev.preventDefault(); press('#new-chat') || (sidebarToggle() && sidebarToggle().click(), setTimeout(() => press('#new-chat'), 300));
    } else if (mod && ev.shiftKey && key === 'c') {
      const last = lastAnswer();
      if (last) { ev.preventDefault(); copyText(answerText(last)); }
    } else if (mod && ev.shiftKey && key === 's') {
      const b = sidebarToggle(); if (b) { ev.preventDefault(); b.click(); }
    } else if (mod && ev.shiftKey && key === 'l') {
      ev.preventDefault(); toggleTheme();
    }
  });
}
