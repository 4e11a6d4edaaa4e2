// Measures the board page (deploy/board-bench.sh): the time from the API's answer to the
// rendered board (the page's own performance marks), then what one idle open board costs the
// server: its requests per minute and the share answered 304.
import { chromium } from "playwright-core";

const url = process.env.BOARD_URL;
const idleSeconds = Number(process.env.IDLE_SECONDS || 60);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
  await page.goto(url + "/");
  await page.evaluate((t) => sessionStorage.setItem("pb-token", t), process.env.TOKEN);
  const loads = [];
  for (let i = 0; i < 5; i++) {
    await page.goto(url + "/");
    await page.waitForFunction(() => window.pbTiming && document.querySelectorAll(".column").length > 0, null, { timeout: 60000 });
    loads.push(await page.evaluate(() => ({ ...window.pbTiming, columns: document.querySelectorAll(".column").length, cards: document.querySelectorAll("li.card").length })));
  }
  const statuses = {};
  page.on("response", (r) => {
    if (r.url().endsWith("/api/contacts")) statuses[r.status()] = (statuses[r.status()] || 0) + 1;
  });
  await page.waitForTimeout(idleSeconds * 1000);
  const polls = Object.values(statuses).reduce((a, b) => a + b, 0);
  console.log(JSON.stringify({ loads, idleSeconds, polls, perMinute: (polls * 60) / idleSeconds, statuses, share304: (statuses[304] || 0) / Math.max(1, polls) }));
} finally {
  await browser.close();
}
