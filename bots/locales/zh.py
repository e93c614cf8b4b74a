"""The Simplified Chinese catalogue: every key of bots/locales/en.py, with the same {placeholders}."""

MESSAGES = {
    "queued": "⏳ {who} 已排队{n}{where}{lane}：{what}",
    "n_images": "（{n} 张）",
    "position_estimate": "，约第 {position} 位",
    "position": "，第 {position} 位",
    "ready": "，预计 {when} 完成",
    "ready_by": "，预计 {when} 前完成",
    "lane_relax": " · 放松模式",
    "lane_replay": " · 重跑通道",
    "progress": "🎨 {who} {bar} 第 {step}/{total} 步{ready}：{what}",
    "drawing": "🎨 {who} 正在绘制{ready}：{what}",
    "your_request": "你的请求",
    "the_request": "该请求",
    "done": "✅ {who}{what}{seeds}{cached}{rerun}",
    "seeds": "（种子 {seeds}）",
    "from_cache": " · 来自缓存",
    "rerun": " · 重新运行之前的请求{why}",
    "failed": "❌ {who}无法绘制 {what}：{message}{rerun}",
    "blocked": "🚫 {message} 没有向频道发布任何内容。{rerun}",
    "cancelled": "🛑 已取消：{what}{why}",
    "done_see_below": "{done} · 已完成：见下方",
    "cannot_upload": "❌ {who} 我无法在这里发布图片：请用 `/invite @skillgen` 邀请我。",
    "ping_picture_ready": "🔔 {who} 你的图片已完成（见上方）。",
    "ping_picture_failed": "🔔 {who} 你的图片未能完成（见上方）。",
    "ping_training_ready": "🔔 {who} 你的训练已完成（见上方）。",
    "ping_training_failed": "🔔 {who} 你的训练未能完成（见上方）。",
    "queue_down_request": "❌ 你的请求未能加入队列（队列无法连接）。请一分钟后再试。",
    "queue_down_cancel": "❌ 取消未能发出（队列无法连接）。请一分钟后再试。",
    "busy": "繁忙：约有 {queued_min} 分钟的任务在排队；请约 {retry_min} 分钟后再试",
    "at_cap": "你已有 {count} 个请求在等待；请等其中一个完成（或取消一个）",
    "slow": "我暂时查不到这个按钮对应的请求；请一分钟后再试。",
    "forgotten": "我已不再保存这个按钮对应的请求（结果只能在一段时间内重新生成）；请用相同的提示词再次运行 /skill。",
    "not_owner_cancel": "只有发起请求的人可以取消。",
    "cancel_forgotten": "我已不再保存这个请求，因此无法取消（它可能已经完成）。",
    "cancelling": "正在取消…",
    "not_owner_delete": "只有发起请求的人可以删除。",
    "delete_forgotten": "我已不再保存这个请求，无法确认是谁发起的；可管理本频道消息的人可以删除它。",
    "no_such_image": "这个结果没有第 {index} 张图片。",
    "too_large_to_upscale": "这张图片是 {width}x{height}：放大两倍会超过每边 {max_px} 像素，因此无法放大。",
    "parameters": "复制这一行即可再次生成同一张图：\n{line}",
    "button_reroll": "重新生成",
    "button_vary": "变体",
    "button_remix": "改写重绘",
    "button_params": "参数",
    "button_delete": "删除",
    "button_cancel": "取消",
    "button_upscale_one": "放大 2 倍",
    "button_vary_one": "变化",
    "remix_title": "改写重绘：种子和选项不变",
    "remix_label": "提示词",
    "remix_placeholder": "加上 --ar 16:9、--n 2 等即可更改选项",
    "remix_slack_title": "改写重绘",
    "remix_submit": "绘制",
    "remix_close": "取消",
    "remix_slack_label": "提示词（种子和选项不变）",
    "remix_hint": "加上 --ar 16:9、--n 2 等即可更改选项。",
    "remix_too_slow": "我没能及时打开改写重绘表单；请再点一次“改写重绘”。",
    "remix_empty": "请写下要画的提示词（种子和选项保持不变，除非你加上 --ar 等选项）。",
    "help": (
        "**{command}** 画一张技能图并发在这里。\n"
        "`{command} <提示词> [--no <不要的内容>] [--ar 16:9 | --size 512x768] [--steps N] [--seed N] [--n 1-4] "
        "[--adapter 名称[@vN]] [--relax]`\n"
        "• `--no` 不要出现在画面里的东西  • `--ar` 宽高比，或 `--size` 精确的 宽x高（8 的倍数，64-1024）\n"
        "• `--steps` 1-50  • `--seed` 0-4294967295，同一个种子画出同一张图  • `--n` 张数，1-4\n"
        "• `--adapter` 你团队的一个 LoRA 适配器，最新版本或 `名称@v2`\n"
        "• `--relax` 放松模式：不赶时间，GPU 有空时再画（节省团队的快速额度）\n"
        "• 状态消息上的 **取消** 按钮可在排队或绘制时停止你的请求\n"
        "选项名（`--no`、`--ar` 等）照原样用英文写。示例：`{command} a drummer's paradiddle, top view --ar 16:9 --n 2`"
    ),
}
