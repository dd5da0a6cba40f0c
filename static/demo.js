// duet demo customer: join, chat, and resume after any disconnect.
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  let ws = null, ref = 1, session = JSON.parse(sessionStorage.getItem('duet') || 'null');
  let lastSeq = session ? session.last_seq || 0 : 0, backoff = 250;
  const log = (line) => { const d = $('log'); d.textContent += line + '\n'; d.scrollTop = d.scrollHeight; };
  const save = () => { if (session) { session.last_seq = lastSeq; sessionStorage.setItem('duet', JSON.stringify(session)); } else sessionStorage.removeItem('duet'); };
  const send = (m) => { if (ws && ws.readyState === 1) { m.ref = ref++; ws.send(JSON.stringify(m)); } };
  // A link can fill the form and join at once: /?name=Ann&topic=support&join
  const params = new URLSearchParams(location.search);
  if (params.get('name')) $('name').value = params.get('name');
  if (params.get('topic')) $('topic').value = params.get('topic');
  let autoJoin = params.has('join');
  const join = () => send({ type: 'join', name: $('name').value, topic: $('topic').value });
  function connect() {
    const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
    ws = new WebSocket(url);
    ws.onopen = () => { backoff = 250; $('status').textContent = 'Connected.'; if (session) ws.send(JSON.stringify({ type: 'resume', session_id: session.session_id, resume_token: session.resume_token, last_seq: lastSeq })); else if (autoJoin) { autoJoin = false; join(); } };
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (typeof m.seq === 'number' && m.type !== 'ack') { if (m.seq <= lastSeq) return; lastSeq = m.seq; save(); }
      switch (m.type) {
        case 'session': session = { session_id: m.session_id, resume_token: m.resume_token }; save(); log('· session ' + m.session_id); break;
        case 'queue': $('status').textContent = 'In queue: position ' + m.position + ' of ' + m.waiting + ', about ' + m.eta_s + ' s.'; break;
        case 'assigned': $('status').textContent = 'Talking to ' + m.agent.name + '.'; log('· ' + m.agent.name + ' joined'); break;
        case 'message': log((m.from === 'customer' ? 'you' : m.from) + ': ' + m.text); break;
        case 'typing': $('status').textContent = m.on ? 'The agent is typing…' : ''; break;
        case 'ended': log('· ended (' + m.reason + ')'); session = null; save(); break;
        case 'error': log('! ' + m.code + ': ' + m.message); if (m.code === 'not_found' && session) { session = null; save(); } break;
        case 'resumed': log('· resumed'); break;
        default:
      }
    };
    ws.onclose = () => { $('status').textContent = 'Disconnected; reconnecting…'; setTimeout(connect, backoff); backoff = Math.min(backoff * 2, 5000); };
  }
  $('join').addEventListener('submit', (e) => { e.preventDefault(); join(); });
  $('leave').addEventListener('click', () => send({ type: 'leave' }));
  $('say').addEventListener('submit', (e) => { e.preventDefault(); const t = $('text').value; if (!t) return; send({ type: 'say', text: t }); log('you: ' + t); $('text').value = ''; });
  connect();
})();
