// The board page in headless Chromium (Debian's, through playwright-core), against the running
// stack the Rust test (tests/it/browser.rs) set up. Talks to that test over stdin/stdout: it prints
// `READY_FOR_EVENT <cardId>`, the test produces a change of that card to Kafka and answers
// `EVENT_SENT`. Any failed check throws: the process exits non-zero and the test fails.
import { chromium } from "playwright-core";
import readline from "node:readline";

const url = process.env.BOARD_URL;
const token = process.env.TOKEN;
const expired = process.env.EXPIRED_TOKEN;
const shots = process.env.SHOTS;
const renamed = process.env.RENAMED;
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
}
async function api(body) {
  const r = await fetch(url + "/api/contacts", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer " + token },
    body: JSON.stringify(body),
  });
  check(r.ok, "API answered " + r.status);
  return r.json();
}
const expectedColumns = (answer) => Object.entries(answer.data).map(([name, b]) => [name, b.total, b.contacts.length]);
const shownColumns = (page) =>
  page.$$eval(".column", (cols) => cols.map((c) => [c.dataset.stage, Number(c.querySelector(".total").textContent), c.querySelectorAll("li.card").length]));
async function waitForColumns(page, expected, what) {
  const want = JSON.stringify(expected);
  const deadline = Date.now() + 10000;
  let got;
  while (Date.now() < deadline) {
    got = JSON.stringify(await shownColumns(page));
    if (got === want) return;
    await page.waitForTimeout(100);
  }
  throw new Error(`${what}: the page shows ${got}, the API says ${want}`);
}

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
  page.on("pageerror", (e) => console.error("page error: " + e));
  page.on("console", (m) => console.error("page console: " + m.text()));

  // Sign in with a pasted token.
  await page.goto(url + "/");
  await page.waitForSelector("#signin:not([hidden])");
  await page.screenshot({ path: `${shots}/signin.png` });
  await page.fill("#token", token);
  await page.click("#token-form button");
  await page.waitForSelector(".column");

  // Columns in stage order, each with the API's total and first page.
  await waitForColumns(page, expectedColumns(await api({ size: 25 })), "the board");
  const timing = await page.evaluate(() => window.pbTiming);
  await page.screenshot({ path: `${shots}/board.png` });

  // Scrolling a column loads exactly its next page: no duplicate, no gap.
  const all = await api({ size: 25 });
  const [name, bucket] = Object.entries(all.data).find(([, b]) => b.total > 25) || [];
  check(name, "a column with more than one page");
  await page.evaluate((n) => {
    const ul = [...document.querySelectorAll(".column")].find((c) => c.dataset.stage === n).querySelector("ul");
    ul.scrollTop = ul.scrollHeight;
  }, name);
  const want = Math.min(50, bucket.total);
  await page.waitForFunction(([n, w]) => [...document.querySelectorAll(".column")].find((c) => c.dataset.stage === n).querySelectorAll("li.card").length === w, [name, want]);
  const second = await api({ size: 25, stages: [name], page: { [name]: 2 } });
  const apiIds = bucket.contacts.concat(second.data[name].contacts).map((c) => c._id);
  const pageIds = await page.evaluate((n) => [...[...document.querySelectorAll(".column")].find((c) => c.dataset.stage === n).querySelectorAll("li.card")].map((li) => li.dataset.id), name);
  check(JSON.stringify(pageIds) === JSON.stringify(apiIds), `column ${name} after one scroll: ${pageIds.length} cards, the API's first two pages`);

  // A filter and a search change the totals as the API says, and live in the URL.
  await page.selectOption("select[name=ownerFilter]", "my");
  await waitForColumns(page, expectedColumns(await api({ size: 25, ownerFilter: "my" })), "ownerFilter my");
  await page.fill("input[name=search]", "an");
  await waitForColumns(page, expectedColumns(await api({ size: 25, ownerFilter: "my", search: "an" })), "ownerFilter my + search an");
  check(page.url().includes("ownerFilter=my") && page.url().includes("search=an"), "filters in the URL: " + page.url());
  await page.screenshot({ path: `${shots}/filtered.png` });
  // The shared URL opens the same board.
  await page.goto(page.url());
  await waitForColumns(page, expectedColumns(await api({ size: 25, ownerFilter: "my", search: "an" })), "the shared URL");

  // An event produced to Kafka shows on the open board without a reload.
  await page.goto(url + "/");
  await page.waitForSelector(".column li.card");
  const cardId = await page.$eval(".column li.card", (li) => li.dataset.id);
  console.log("READY_FOR_EVENT " + cardId);
  const answer = await lines.next();
  check(answer.value === "EVENT_SENT", "the test produced the event");
  const sent = Date.now();
  try {
    await page.waitForFunction((t) => document.getElementById("board").innerText.includes(t), renamed, { timeout: 15000 });
  } catch (e) {
    const cols = await page.evaluate(() => window.pbBoard.columns.map((c) => [c.name, c.etag, c.cards.length]));
    const now = JSON.stringify(await api({ size: 25 })).includes(renamed);
    throw new Error(`the change did not show: columns ${JSON.stringify(cols)}; the API shows it: ${now}`);
  }
  const liveMs = Date.now() - sent;
  await page.screenshot({ path: `${shots}/live.png` });

  // Error states: an unknown pipeline (404), an expired token (401: sign in again).
  await page.goto(url + "/?pipelineId=000000000000000000000000");
  await page.waitForSelector('.state.error[data-status="404"]');
  await page.screenshot({ path: `${shots}/error-404.png` });
  await page.evaluate((t) => sessionStorage.setItem("pb-token", t), expired);
  await page.goto(url + "/");
  await page.waitForSelector("#signin:not([hidden])");
  const why = await page.textContent("#signin-why");
  check(why.includes("401"), "the sign-in says why: " + why);
  await page.screenshot({ path: `${shots}/error-401.png` });

  // 503: an API whose Redis and MongoDB are both down.
  const down = await browser.newPage({ viewport: { width: 1600, height: 900 } });
  await down.goto(process.env.DOWN_URL + "/");
  await down.fill("#token", token);
  await down.click("#token-form button");
  await down.waitForSelector('.state.error[data-status="503"]', { timeout: 30000 });
  await down.screenshot({ path: `${shots}/error-503.png` });

  console.log("RESULT " + JSON.stringify({ timing, liveMs }));
} finally {
  await browser.close();
}
process.exit(0);
